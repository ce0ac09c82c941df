"""SWIFT's on-the-fly layer-set search (arXiv 2410.06916, §4.2 of docs/ALGORITHMS.md), torch-free.

SWIFT drafts with the target model itself, some of its sub-layers skipped. Which sub-layers to
skip is searched for while the server runs: every optimisation iteration proposes a candidate
skip set (random search, and every ``bayes_interval``-th iteration a Bayesian-optimisation
suggestion), the drafter scores it by its *matchness* over recently generated tokens, and the
candidate is kept only if it scores better than the current set. The search stops when the
score is good enough, when too many candidates in a row failed to improve on it, or after
``max_opt_iter`` candidates.

This module holds only the search logic; the drafter (``drafters/swift.py``) runs the model and
hands the scores in. Pieces:

- :class:`SkipSet` (``drafters/swift_skipset.py``): which sub-layers are skipped;
- :class:`SearchConfig`: the reference's hyperparameters;
- :class:`LayerSearch`: the search state of one task, kept across the request stream (its
  iteration and tolerance counters are cumulative, as in the reference);
- :class:`SearchStore`: task key -> :class:`LayerSearch`, saved and loaded as one JSON file;
- :func:`matchness`: the reference's score.

Bayesian optimisation uses ``bayesian-optimization`` (``bayes_opt``), the reference
implementation's library: a Gaussian process (Matérn 2.5 kernel, ``alpha=1e-2``) with the
upper-confidence-bound acquisition (``kappa=2.5``), one continuous coordinate in [0, 1] per
sub-layer; the top ``num_skip`` coordinates of a suggestion become the skipped set.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from drafters.swift_skipset import SkipSet, num_coordinates

__all__ = ["LayerSearch", "SearchConfig", "SearchStore", "matchness"]


# ----------------------------------------------------------------------------- config


class SearchConfig(BaseModel):
    """Hyperparameters of the layer-set search; defaults are the reference's argparse defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    skip_ratio: float = Field(0.45, gt=0, lt=1, description=(
        "Share of the 2*(L-2) skippable sub-layers each candidate skips: int(2*(L-2)*skip_ratio)"))
    context_window: int = Field(32, ge=1, description=(
        "Generated tokens a candidate is scored over (the drafter scores the first "
        "context_window+1 generated tokens; the reference's eval script uses 50)"))
    bayes_interval: int = Field(25, ge=1, description=(
        "Every bayes_interval-th candidate is the Bayesian optimiser's suggestion, the others random"))
    max_opt_iter: int = Field(1000, ge=1, description="Stop after this many candidates (cumulative)")
    max_tolerance: int = Field(300, ge=0, description=(
        "Stop when more than this many candidates in a row failed to improve on the best set"))
    max_score: float = Field(0.95, gt=0, le=1, description=(
        "Stop once the best set's matchness exceeds this (the reference's eval script uses 0.93)"))
    seed: int = Field(0, ge=0, description="Seed of the random search and of the Bayesian optimiser")
    bayes_starts: int = Field(10, ge=0, description=(
        "L-BFGS-B runs when maximising the UCB (bayes_opt's n_smart, 10 as in the reference), each "
        "from one of the best of 10 000 random points; 0: the best random point. They dominate a "
        "suggestion's cost (about 0.5 s each for 30 layers on 2 CPU cores)"))

    def num_skip(self, num_layers: int) -> int:
        """Sub-layers each candidate skips for a ``num_layers``-layer model."""
        return int(num_coordinates(num_layers) * self.skip_ratio)


# ----------------------------------------------------------------------------- Bayesian optimiser


def _ucb(kappa: float, starts: int):
    """``bayes_opt``'s UCB acquisition with ``starts`` L-BFGS-B runs (its ``n_smart``, which
    ``BayesianOptimization.suggest`` does not expose) when maximising it."""
    from bayes_opt import acquisition

    class UpperConfidenceBound(acquisition.UpperConfidenceBound):
        def suggest(self, *args: Any, **kwargs: Any):
            kwargs["n_smart"] = starts
            return super().suggest(*args, **kwargs)

    return UpperConfidenceBound(kappa=kappa)


class _BayesOptimizer:
    """``bayes_opt``'s GP + UCB over one [0, 1] coordinate per sub-layer (named ``a01``.., ``m01``..),
    set up as in the reference: ``alpha=1e-2``, ``kappa=2.5``, points registered by the caller."""

    KAPPA = 2.5
    GP_ALPHA = 1e-2

    def __init__(self, num_layers: int, seed: int, starts: int = 10) -> None:
        # imported here: bayes_opt pulls scikit-learn and scipy, needed only while a search runs
        from bayes_opt import BayesianOptimization

        width = max(2, len(str(num_layers - 2)))
        layers = range(1, num_layers - 1)
        self.keys = [f"a{i:0{width}d}" for i in layers] + [f"m{i:0{width}d}" for i in layers]
        self._optimizer = BayesianOptimization(
            f=None,
            pbounds={key: (0.0, 1.0) for key in self.keys},
            acquisition_function=_ucb(self.KAPPA, starts),
            random_state=seed,
            verbose=0,
            allow_duplicate_points=False,
        )
        self._optimizer.set_gp_params(alpha=self.GP_ALPHA)

    def suggest(self) -> list[float]:
        """The UCB maximiser given the points registered so far (a uniform random point before any)."""
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            # 0/1 training points often push the kernel's length scale onto its bound
            warnings.simplefilter("ignore", ConvergenceWarning)
            point = self._optimizer.suggest()
        return [float(point[key]) for key in self.keys]

    def register(self, vector: Sequence[float], target: float) -> bool:
        """Add an observation; False (and nothing added) when the point is already registered."""
        from bayes_opt.exception import NotUniqueError

        try:
            self._optimizer.register(params=dict(zip(self.keys, map(float, vector))), target=target)
        except NotUniqueError:
            return False
        return True

    def __len__(self) -> int:
        return len(self._optimizer.space)


# ----------------------------------------------------------------------------- the search


class LayerSearch:
    """The layer-set search of one task, fed one scored candidate at a time.

    Usage: ``candidate = search.propose()``, score it, ``search.report(candidate, score)``; or
    ``search.step(score_fn)`` for both. ``best`` / ``best_score`` are the set to draft with and
    its matchness. As in the reference, the initial set's score counts as 0 until measured (so
    the first candidate with a positive score replaces it); reporting the initial set as the
    very first call measures it instead (the baseline, not counted as an iteration).

    Bookkeeping follows ``swift_optimization`` of the reference: a candidate is kept iff its
    score is strictly above the best one, which resets ``tolerance`` (failed candidates in a
    row); otherwise ``tolerance`` grows. ``iteration`` counts reported candidates. The search is
    ``done`` when the best score exceeds ``max_score``, ``tolerance`` exceeds ``max_tolerance``,
    or ``iteration`` reaches ``max_opt_iter``; a done search holds no optimiser and proposes
    nothing. ``history`` holds ``(iteration, candidate score, best score)`` per report, for a
    matchness-over-time plot (the baseline at iteration 0).
    """

    def __init__(self, num_layers: int, config: SearchConfig | None = None,
                 initial: SkipSet | None = None) -> None:
        self.config = config or SearchConfig()
        self.num_layers = num_layers
        self.num_skip = self.config.num_skip(num_layers)
        self.best = initial or SkipSet.initial(num_layers)
        if self.best.num_layers != num_layers:
            raise ValueError(f"initial set is for {self.best.num_layers} layers, not {num_layers}")
        self.best_score = 0.0
        self.iteration = 0
        self.tolerance = 0
        self.done = False
        self.stop_reason: str | None = None
        self.history: list[tuple[int, float, float]] = []
        self._optimizer: _BayesOptimizer | None = None
        self._rng: np.random.Generator | None = None
        self._start_optimizer()

    # ---- the loop

    def propose(self) -> SkipSet:
        """The next candidate: the BO suggestion on every ``bayes_interval``-th iteration
        (1-based, as the reference's ``(opt_iter + 1) % bayes_interval == 0``), else random."""
        if self.done:
            raise RuntimeError(f"the layer search is done ({self.stop_reason}); draft with .best")
        if self.is_bayes_turn():
            return SkipSet.from_top(self.num_layers, self._optimizer.suggest(), self.num_skip)
        return SkipSet.random(self.num_layers, self.num_skip, self._rng)

    def report(self, candidate: SkipSet, score: float) -> bool:
        """Record ``candidate``'s matchness; True iff it became the best set."""
        if self.done:
            raise RuntimeError(f"the layer search is done ({self.stop_reason})")
        if candidate.num_layers != self.num_layers:
            raise ValueError(f"candidate is for {candidate.num_layers} layers, not {self.num_layers}")
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"score must be finite, got {score}")
        self._optimizer.register(candidate.vector(), score)
        if not self.history and candidate == self.best:
            improved = True                                  # baseline: measures the initial set
            self.best_score = score
        else:
            improved = score > self.best_score
            if improved:
                self.best, self.best_score, self.tolerance = candidate, score, 0
            else:
                self.tolerance += 1
            self.iteration += 1
        self.history.append((self.iteration, score, self.best_score))
        self._check_stop()
        return improved

    def step(self, score_fn: Callable[[SkipSet], float]) -> SkipSet:
        """Propose, score with ``score_fn`` and report, unless done; returns the best set."""
        if not self.done:
            candidate = self.propose()
            self.report(candidate, score_fn(candidate))
        return self.best

    def is_bayes_turn(self) -> bool:
        """Whether the next proposal comes from the Bayesian optimiser."""
        return (self.iteration + 1) % self.config.bayes_interval == 0

    # ---- state

    def state_json(self) -> dict[str, Any]:
        """The found set and the counters (not the optimiser's internals), JSON-serialisable."""
        return {
            "best": self.best.to_json(),
            "best_score": self.best_score,
            "iteration": self.iteration,
            "tolerance": self.tolerance,
            "done": self.done,
            "stop_reason": self.stop_reason,
            "history": [list(entry) for entry in self.history],
        }

    @classmethod
    def from_state_json(cls, state: dict[str, Any], config: SearchConfig | None = None) -> LayerSearch:
        """Inverse of :meth:`state_json`. A done state stays done (the search is off, like the
        reference's cached ``skip_layers.json``); otherwise the search goes on from the saved set
        and counters with a fresh optimiser, and stops at once if ``config``'s rules say so."""
        best = SkipSet.from_json(state["best"])
        search = cls(best.num_layers, config, initial=best)
        search.best_score = float(state["best_score"])
        search.iteration = int(state["iteration"])
        search.tolerance = int(state["tolerance"])
        search.history = [(int(i), float(s), float(b)) for i, s, b in state.get("history", [])]
        if state["done"]:
            search._stop(state.get("stop_reason") or "loaded")
        else:
            search._start_optimizer()                    # reseeded for the saved iteration
            search._check_stop()
        return search

    # ---- internals

    def _start_optimizer(self) -> None:
        """Fresh random-search generator and BO, seeded by the config's seed and the iteration
        (so a resumed search does not replay the candidates it already tried)."""
        self._rng = np.random.default_rng([self.config.seed, self.iteration])
        self._optimizer = _BayesOptimizer(self.num_layers, seed=int(self._rng.integers(2**31)),
                                          starts=self.config.bayes_starts)

    def _check_stop(self) -> None:
        """Apply the stop rules; a stopped search drops its optimiser."""
        if self.best_score > self.config.max_score:
            self._stop("max_score")
        elif self.tolerance > self.config.max_tolerance:
            self._stop("max_tolerance")
        elif self.iteration >= self.config.max_opt_iter:
            self._stop("max_opt_iter")

    def _stop(self, reason: str) -> None:
        """End the search for good: the best set stays, the optimiser goes."""
        self.done, self.stop_reason = True, reason
        self._optimizer = self._rng = None


# ----------------------------------------------------------------------------- per-task store


class SearchStore:
    """One :class:`LayerSearch` per task key, created on first use from :meth:`SkipSet.initial`.

    The default key is the served model's name; a request may name its own key. ``save`` /
    ``load`` keep every search in one JSON file mapping keys to :meth:`LayerSearch.state_json`,
    so a deployment starts warm (a done state means that task's search is off).
    """

    def __init__(self, num_layers: int, config: SearchConfig | None = None,
                 default_key: str = "default") -> None:
        self.num_layers = num_layers
        self.config = config or SearchConfig()
        self.default_key = default_key
        self._searches: dict[str, LayerSearch] = {}
        self._lock = threading.Lock()

    def get(self, key: str | None = None) -> LayerSearch:
        """The search of ``key`` (default: ``default_key``), created if new."""
        key = self.default_key if key is None else key
        with self._lock:
            search = self._searches.get(key)
            if search is None:
                search = self._searches[key] = LayerSearch(self.num_layers, self.config)
            return search

    def __contains__(self, key: str) -> bool:
        return key in self._searches

    def __len__(self) -> int:
        return len(self._searches)

    def keys(self) -> list[str]:
        return list(self._searches)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write all searches to ``path`` (atomically: a temporary file, then a rename)."""
        with self._lock:
            data = {key: search.state_json() for key, search in self._searches.items()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], config: SearchConfig | None = None, *,
             num_layers: int | None = None, default_key: str = "default") -> SearchStore:
        """Read a file written by :meth:`save`. ``num_layers`` (the served model's) is checked
        against the saved sets; it may be left out when the file holds at least one search."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a JSON object mapping task keys to search states")
        searches = {key: LayerSearch.from_state_json(state, config) for key, state in data.items()}
        layer_counts = {search.num_layers for search in searches.values()}
        if num_layers is not None:
            layer_counts.add(num_layers)
        if len(layer_counts) != 1:
            raise ValueError(f"{path}: skip sets for {sorted(layer_counts)} layers; expected one count"
                             if layer_counts else f"{path} holds no search: pass num_layers")
        store = cls(layer_counts.pop(), config, default_key)
        store._searches = searches
        return store


# ----------------------------------------------------------------------------- the score


def matchness(predicted: Sequence[int], generated: Sequence[int]) -> float:
    """The reference's draft score, ``mean(argmax_pred[:-1] == generated[1:])``.

    ``generated`` is a run of tokens the full model produced; ``predicted[i]`` is the skipped
    model's argmax at position ``i`` of one teacher-forced forward over ``generated`` (so its
    guess for the token after ``generated[..i]``), compared with ``generated[i+1]``. The last
    prediction has nothing to compare with and is ignored. Both runs have the same length, at
    least 2; the result is the share of the ``len - 1`` comparisons that match.
    """
    if len(predicted) != len(generated):
        raise ValueError(f"predicted ({len(predicted)}) and generated ({len(generated)}) differ in length")
    if len(generated) < 2:
        raise ValueError("matchness needs at least 2 generated tokens")
    hits = sum(int(p) == int(g) for p, g in zip(predicted[:-1], generated[1:]))
    return hits / (len(generated) - 1)
