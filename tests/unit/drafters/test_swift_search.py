"""SWIFT's layer-set search (drafters/swift_search.py): skip sets, the search loop, stop rules, JSON state."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from pydantic import ValidationError

from drafters.swift_search import LayerSearch, SearchConfig, SearchStore, matchness
from drafters.swift_skipset import SkipSet

L = 10                                  # 16 skippable sub-layers; num_skip = int(16 * 0.45) = 7


# ----------------------------------------------------------------------------- helpers


def hidden_good_score(good: SkipSet, num_skip: int):
    """Score = share of a candidate's skipped coordinates that lie in ``good`` (1.0 reachable)."""
    good_bits = np.array(good.vector())

    def score(candidate: SkipSet) -> float:
        return float(good_bits @ np.array(candidate.vector())) / num_skip

    return score


GOOD = SkipSet(L, attn=(1, 2, 4, 6), mlp=(2, 4, 6))   # 7 coordinates; shares only a1 with the initial set


def no_call(candidate: SkipSet) -> float:
    raise AssertionError("score_fn called on a finished search")


# ----------------------------------------------------------------------------- SkipSet


@pytest.mark.parametrize("attn, mlp", [((0,), ()), ((), (L - 1,)), ((L,), ()), ((), (-1,)), ((2, 2), ())])
def test_skipset_rejects_first_last_out_of_range_and_duplicates(attn, mlp):
    with pytest.raises(ValueError):
        SkipSet(L, attn=attn, mlp=mlp)


def test_skipset_sorts_and_bounds():
    s = SkipSet(L, attn=(8, 1, 3), mlp=(5,))
    assert s.attn == (1, 3, 8) and s.mlp == (5,)
    assert s.num_skipped == 4 and s.ratio == pytest.approx(4 / 16)
    with pytest.raises(ValueError):
        SkipSet(2)


def test_vector_layout_and_round_trip():
    s = SkipSet(L, attn=(1, 8), mlp=(2,))
    v = s.vector()
    assert len(v) == 2 * (L - 2)
    assert v[0] == 1 and v[7] == 1                  # attention of layers 1 and 8 come first
    assert v[8 + 1] == 1                            # then MLP: layer 2 at 8 + (2 - 1)
    assert sum(v) == 3
    assert SkipSet.from_vector(L, v) == s
    rng = np.random.default_rng(3)
    for _ in range(20):
        bits = rng.integers(0, 2, 2 * (L - 2)).tolist()
        assert SkipSet.from_vector(L, bits).vector() == bits
    with pytest.raises(ValueError):
        SkipSet.from_vector(L, v[:-1])
    with pytest.raises(ValueError):
        SkipSet.from_vector(L, [2] + v[1:])


def test_from_top_takes_highest_coordinates():
    scores = [0.0] * 16
    for coord, value in [(0, 0.9), (5, 0.8), (9, 0.95), (15, 0.7), (3, 0.1)]:
        scores[coord] = value
    s = SkipSet.from_top(L, scores, 4)
    assert s.attn == (1, 6) and s.mlp == (2, 8)     # coords 0, 5 (attention); 9, 15 (MLP)
    assert SkipSet.from_top(L, scores, 0).num_skipped == 0
    with pytest.raises(ValueError):
        SkipSet.from_top(L, scores, 17)
    with pytest.raises(ValueError):
        SkipSet.from_top(L, scores[:-1], 3)


def test_initial_set_for_30_layers():
    s = SkipSet.initial(30)
    odd = tuple(range(1, 28, 2))
    assert s.attn == odd and s.mlp == odd           # 1, 3, ..., 27 = L-3
    assert s.num_skipped == 28 and s.ratio == pytest.approx(28 / 56)
    assert SkipSet.initial(9).attn == (1, 3, 5, 7)  # odd L: L-2 is odd and skippable


def test_random_count_and_determinism():
    a = SkipSet.random(30, 25, np.random.default_rng(7))
    b = SkipSet.random(30, 25, np.random.default_rng(7))
    c = SkipSet.random(30, 25, np.random.default_rng(8))
    assert a == b and a != c
    assert a.num_skipped == 25 and sum(a.vector()) == 25


def test_skipset_json_round_trip():
    s = SkipSet(L, attn=(2, 5), mlp=(1, 3, 8))
    data = json.loads(json.dumps(s.to_json()))
    assert data == {"num_layers": L, "attn": [2, 5], "mlp": [1, 3, 8]}
    assert SkipSet.from_json(data) == s


# ----------------------------------------------------------------------------- config and matchness


def test_config_defaults_and_validation():
    cfg = SearchConfig()
    assert (cfg.skip_ratio, cfg.context_window, cfg.bayes_interval) == (0.45, 32, 25)
    assert (cfg.max_opt_iter, cfg.max_tolerance, cfg.max_score) == (1000, 300, 0.95)
    assert cfg.num_skip(40) == 34                   # LLaMA-2-13B: 34 of 76 sub-layers
    assert cfg.num_skip(30) == 25
    with pytest.raises(ValidationError):
        SearchConfig(unknown=1)
    with pytest.raises(ValidationError):
        SearchConfig(skip_ratio=1.5)


def test_matchness_alignment():
    generated = [5, 6, 7, 8, 9]
    # predicted[i] guesses generated[i+1]; the last prediction is ignored
    assert matchness([6, 7, 8, 9, 123], generated) == 1.0
    assert matchness([6, 0, 8, 0, 9], generated) == 0.5
    assert matchness([5, 6, 7, 8, 9], generated) == 0.0    # unshifted comparison would give 1.0
    with pytest.raises(ValueError):
        matchness([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        matchness([1], [1])


# ----------------------------------------------------------------------------- the search


def test_search_improves_on_the_initial_set_and_never_regresses():
    cfg = SearchConfig(max_opt_iter=150, max_tolerance=150, max_score=1.0, bayes_interval=25, bayes_starts=3)
    search = LayerSearch(L, cfg)
    score = hidden_good_score(GOOD, search.num_skip)
    initial_score = score(search.best)
    assert search.report(search.best, initial_score)          # baseline: not an iteration
    assert search.iteration == 0 and search.best_score == initial_score
    while not search.done:
        search.step(score)
    assert search.iteration == 150 and search.stop_reason == "max_opt_iter"
    assert search.best_score > initial_score
    assert search.best_score == score(search.best)            # the kept set is the one that scored
    assert search.best.num_skipped == search.num_skip
    iterations = [i for i, _, _ in search.history]
    assert iterations == list(range(151))
    bests = [b for _, _, b in search.history]
    assert all(b1 >= b0 for b0, b1 in itertools.pairwise(bests))
    assert bests[-1] == max(s for _, s, _ in search.history)


def test_accept_or_revert_and_tolerance_reset():
    cfg = SearchConfig(bayes_interval=1000)
    search = LayerSearch(L, cfg)
    initial = search.best
    a, b = SkipSet(L, attn=(2,)), SkipSet(L, mlp=(3,))
    assert not search.report(a, 0.0)                          # not above the unmeasured 0: reverted
    assert search.best == initial and search.tolerance == 1 and search.iteration == 1
    assert search.report(a, 0.4)
    assert search.best == a and search.tolerance == 0
    assert not search.report(b, 0.4)                          # ties do not replace
    assert search.best == a and search.best_score == 0.4 and search.tolerance == 1
    assert search.history == [(1, 0.0, 0.0), (2, 0.4, 0.4), (3, 0.4, 0.4)]


def test_propose_is_deterministic_given_the_seed():
    def run(seed):
        search = LayerSearch(L, SearchConfig(seed=seed, bayes_interval=4, max_score=1.0, bayes_starts=2))
        score = hidden_good_score(GOOD, search.num_skip)
        for _ in range(9):
            search.step(score)
        return search.history, search.best

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bayes_suggestion_on_every_bayes_interval_th_proposal(monkeypatch):
    interval = 5
    search = LayerSearch(L, SearchConfig(bayes_interval=interval, max_score=1.0, bayes_starts=2))
    optimizer = search._optimizer
    real_suggest = optimizer.suggest
    bayes_at, points = [], []

    def spy():
        bayes_at.append(search.iteration)
        points.append(real_suggest())
        return points[-1]

    monkeypatch.setattr(optimizer, "suggest", spy)
    score = hidden_good_score(GOOD, search.num_skip)
    proposals = []
    for _ in range(3 * interval + 2):
        candidate = search.propose()
        proposals.append(candidate)
        search.report(candidate, score(candidate))
    # iterations are 0-based: proposals 5, 10, 15 (1-based) are the BO's
    assert bayes_at == [interval - 1, 2 * interval - 1, 3 * interval - 1]
    for it, point in zip(bayes_at, points):
        assert proposals[it] == SkipSet.from_top(L, point, search.num_skip)
    assert all(p.num_skipped == search.num_skip for p in proposals)
    assert len(optimizer) == len(set(proposals))              # every distinct point registered once


@pytest.mark.parametrize("starts", [0, 2])
def test_bayes_starts_reach_the_acquisition_maximiser(monkeypatch, starts):
    search = LayerSearch(L, SearchConfig(bayes_interval=2, bayes_starts=starts))
    acquisition = search._optimizer._optimizer.acquisition_function
    seen = []
    real = acquisition._acq_min

    def spy(*args, **kwargs):
        seen.append(kwargs["n_smart"])
        return real(*args, **kwargs)

    monkeypatch.setattr(acquisition, "_acq_min", spy)
    search.step(lambda c: 0.3)
    search.step(lambda c: 0.5)                                # the BO's turn: fits and maximises UCB
    assert seen == [starts] and search.best_score == 0.5


def test_duplicate_candidates_are_not_registered_twice():
    search = LayerSearch(L, SearchConfig(bayes_interval=1000))
    a = SkipSet(L, attn=(2, 3))
    search.report(a, 0.2)
    search.report(a, 0.3)                                     # the library refuses the repeat
    assert len(search._optimizer) == 1
    assert search.best_score == 0.3 and search.iteration == 2


def test_stop_on_max_score():
    search = LayerSearch(L, SearchConfig(max_score=0.95))
    search.step(lambda c: 0.96)
    assert search.done and search.stop_reason == "max_score" and search.iteration == 1
    best = search.best
    assert search.step(no_call) == best
    with pytest.raises(RuntimeError):
        search.propose()


def test_stop_on_max_score_from_the_baseline():
    search = LayerSearch(L)
    search.report(search.best, 0.97)
    assert search.done and search.stop_reason == "max_score" and search.iteration == 0


def test_stop_on_tolerance():
    search = LayerSearch(L, SearchConfig(max_tolerance=3, bayes_interval=1000))
    initial = search.best
    search.report(initial, 0.5)
    for _ in range(3):
        search.step(lambda c: 0.1)
        assert not search.done
    search.step(lambda c: 0.1)                                # tolerance 4 > 3
    assert search.done and search.stop_reason == "max_tolerance"
    assert search.tolerance == 4 and search.best == initial and search.best_score == 0.5
    assert search.step(no_call) == initial


def test_stop_on_max_opt_iter():
    search = LayerSearch(L, SearchConfig(max_opt_iter=5, bayes_interval=1000))
    scores = iter([0.1, 0.2, 0.3, 0.4, 0.5])
    for _ in range(5):
        search.step(lambda c: next(scores))
    assert search.done and search.stop_reason == "max_opt_iter"
    assert search.iteration == 5 and search.tolerance == 0 and search.best_score == 0.5
    best = search.best
    assert search.step(no_call) == best


# ----------------------------------------------------------------------------- JSON state and the store


def test_state_round_trip_of_a_running_search():
    cfg = SearchConfig(bayes_interval=4, max_score=1.0)
    search = LayerSearch(L, cfg)
    score = hidden_good_score(GOOD, search.num_skip)
    search.report(search.best, score(search.best))
    for _ in range(6):
        search.step(score)
    state = json.loads(json.dumps(search.state_json()))
    loaded = LayerSearch.from_state_json(state, cfg)
    assert loaded.state_json() == search.state_json()
    assert (loaded.best, loaded.best_score, loaded.iteration) == (search.best, search.best_score, 6)
    assert not loaded.done and len(loaded._optimizer) == 0    # a fresh optimiser
    loaded.step(score)
    assert loaded.iteration == 7 and len(loaded.history) == len(search.history) + 1


def test_state_round_trip_of_a_done_search():
    search = LayerSearch(L, SearchConfig(max_opt_iter=3, bayes_interval=1000))
    for value in (0.2, 0.6, 0.1):
        search.step(lambda c, v=value: v)
    assert search.done
    loaded = LayerSearch.from_state_json(json.loads(json.dumps(search.state_json())))
    assert loaded.done and loaded.stop_reason == "max_opt_iter"
    assert loaded._optimizer is None
    assert loaded.best == search.best and loaded.best_score == 0.6 and loaded.tolerance == 1
    assert loaded.history == search.history
    with pytest.raises(RuntimeError):
        loaded.propose()
    assert loaded.step(no_call) == search.best


def test_loaded_state_obeys_the_new_config():
    search = LayerSearch(L, SearchConfig(bayes_interval=1000))
    for value in (0.2, 0.3, 0.4):
        search.step(lambda c, v=value: v)
    loaded = LayerSearch.from_state_json(search.state_json(), SearchConfig(max_opt_iter=3))
    assert loaded.done and loaded.stop_reason == "max_opt_iter"


def test_store_per_key_and_round_trip(tmp_path):
    cfg = SearchConfig(max_opt_iter=2, bayes_interval=1000)
    store = SearchStore(L, cfg, default_key="SmolLM2-135M")
    default = store.get()
    assert store.get("SmolLM2-135M") is default and default.best == SkipSet.initial(L)
    code = store.get("code")
    assert code is not default and len(store) == 2
    for value in (0.3, 0.7):
        code.step(lambda c, v=value: v)
    assert code.done and not default.done

    path = tmp_path / "skip_layers.json"
    store.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"SmolLM2-135M", "code"}
    assert data["code"]["best"] == code.best.to_json() and data["code"]["done"] is True

    loaded = SearchStore.load(path, cfg, default_key="SmolLM2-135M")
    assert loaded.num_layers == L and loaded.keys() == ["SmolLM2-135M", "code"]
    assert loaded.get("code").done and loaded.get("code").best == code.best
    assert loaded.get("code").step(no_call) == code.best
    assert not loaded.get().done and loaded.get().best == default.best
    assert loaded.get("new-task").best == SkipSet.initial(L)

    with pytest.raises(ValueError):
        SearchStore.load(path, cfg, num_layers=L + 2)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(ValueError):
        SearchStore.load(empty)
    assert SearchStore.load(empty, num_layers=L).num_layers == L
