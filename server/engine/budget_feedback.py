"""Budgets checked on served steps (torch-free): calibration's choice per batch size, kept only while
the steps the server actually runs say it is faster than the alternative.

Start-up calibration predicts a step's cost from timed forwards of synthetic requests, and served
steps differ: other context lengths, drafters catching up on tokens, a host busier than at start-up.
On MT-bench at 8 concurrent requests it predicted 1.17x plain decoding and the server ran at 0.91x
(bench/results/issue8/mt_bench_c8_stage7.json). So the server keeps measuring. For each number of
decoding requests ``b`` there are two arms: the calibrated budget (the *leader*) and its alternative
(the *probe*: plain decoding where calibration chose a tree, the best predicted tree where it chose
plain decoding). The leader serves; after every ``interval`` clean leader steps at ``b`` the probe
serves one clean step. A clean step only decodes (no prefill chunk, no preemption), and its rate is
the tokens it committed per second of the whole engine step. A tree probing after plain steps first
serves one unmeasured clean step: in it the drafter catches up on the tokens committed while it did not
draft, a one-off cost that a tree leading step after step does not pay.

Each probe's rate over the leader's rate across the clean steps since the previous probe is one
*paired* ratio: the host's speed and the requests' context lengths drift over minutes, and both sides
of a ratio see the same. Single steps are noisy (a tree step commits anywhere from ``b`` to
``b * (depth + 1)`` tokens), and the window of ratios is re-tested after every probe, so a swap needs
evidence: with ``m`` the mean log ratio over the last ``window`` probes (at least ``min_pairs``) and
``se`` its standard error, plain decoding replaces a tree when ``m - z_plain * se > 0``, and a tree
replaces plain decoding only when ``m - z_tree * se > log(1 + margin)``. Near ties and noise thus settle
on plain decoding, which the promise "never slower than plain decoding" asks for. While the leader
holds and the probe's mean does not clear its edge (0, or ``log(1 + margin)`` for a tree), the
interval doubles up to ``max_interval`` (quadruples up to ``4 * max_interval`` while the probe is
clearly worse: its mean plus ``z_tree`` standard errors below ``log(1 - clearly_worse)``), so a settled
choice costs about ``1 / max_interval`` of the gap between the arms or less (twice that for a tree
probing against plain decoding).

Evidence belongs to the requests it was measured on. At batch 1 a step's acceptance is one request's,
and requests differ: MT-bench's first writing question accepts 1-2 tokens a step at budget 8 and plain
decoding rightly takes over, but the next question accepts 3 and would be served plain until rare probes
proved otherwise (~55 s of one run, bench/results/README.md "session p"). So when a clean step shares no
request with the previous clean step at its batch size while the leader is not calibration's choice,
the arms restart from calibration's choice with no ratios and probes ``min_interval`` apart. At larger
batches consecutive steps share requests, so this only happens when a whole batch was replaced; a
calibrated leader is never restarted, so the common case pays nothing. ``bench/budget_feedback_sim.py``
measures all this on simulated noisy steps.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from server.engine.budget import BudgetPolicy

log = logging.getLogger(__name__)


@dataclass
class _Arms:
    """One batch size's leader and probe budgets and the paired measurements between them."""

    leader: int
    probe: int
    interval: int
    calibrated: int = 0           # calibration's choice, the leader a restart goes back to
    requests: frozenset[str] = frozenset()   # the previous clean step's requests
    leader_tokens: int = 0        # committed by clean leader steps since the last probe
    leader_seconds: float = 0.0
    leader_steps: int = 0
    warmed: bool = False          # a tree probe's unmeasured catch-up step is done
    ratios: deque[float] = field(default_factory=deque)   # log(probe rate / leader rate), oldest first

    @property
    def probe_due(self) -> bool:
        return self.leader_steps >= self.interval


class ServedBudgets:
    """The scheduler's budget policy with feedback: ``serve`` picks a step's budget, ``observe`` reports
    a clean step's committed tokens and seconds. ``budget``, ``table`` and ``describe`` give the leaders,
    as ``BudgetPolicy`` does."""

    def __init__(self, prior: BudgetPolicy, probes: tuple[int | None, ...], *, min_interval: int = 4,
                 max_interval: int = 64, window: int = 12, min_pairs: int = 4, margin: float = 0.02,
                 z_plain: float = 1.0, z_tree: float = 2.0, clearly_worse: float = 0.1):
        if len(probes) != len(prior.budgets):
            raise ValueError("one probe budget (or None) per batch size of the prior policy")
        if not 2 <= min_pairs <= window or not 1 <= min_interval <= max_interval:
            raise ValueError("need 2 <= min_pairs <= window and 1 <= min_interval <= max_interval")
        self.prior = prior
        self.min_interval, self.max_interval, self.min_pairs = min_interval, max_interval, min_pairs
        self.margin, self.z_plain, self.z_tree, self.clearly_worse = margin, z_plain, z_tree, clearly_worse
        self.arms: list[_Arms | None] = [
            _Arms(n, p, min_interval, n, ratios=deque(maxlen=window)) if p is not None and p != n else None
            for n, p in zip(prior.budgets, probes)]

    def budget(self, num_decoding: int) -> int:
        """The leader: the budget in force for this many decoding requests."""
        arms = self.arms[self.prior.index(num_decoding)]
        return arms.leader if arms else self.prior.budget(num_decoding)

    def serve(self, num_decoding: int) -> int:
        """This step's budget: the probe when one is due, else the leader."""
        arms = self.arms[self.prior.index(num_decoding)]
        if arms is None:
            return self.prior.budget(num_decoding)
        return arms.probe if arms.probe_due else arms.leader

    def observe(self, num_decoding: int, budget: int, tokens: int, seconds: float,
                requests: frozenset[str] = frozenset()) -> None:
        """A clean step's result: ``num_decoding`` requests (ids ``requests``; empty: unknown) at
        ``budget`` committed ``tokens`` in ``seconds`` (the whole engine step)."""
        i = self.prior.index(num_decoding)
        arms = self.arms[i]
        if arms is None or seconds <= 0 or tokens <= 0:
            return
        if requests and arms.requests and not requests & arms.requests and arms.leader != arms.calibrated:
            self._restart(i + 1, arms)
        arms.requests = requests
        if budget == arms.leader and not arms.probe_due:
            arms.leader_tokens += tokens
            arms.leader_seconds += seconds
            arms.leader_steps += 1
        elif budget == arms.probe and arms.probe_due:
            if arms.probe and not arms.warmed:
                arms.warmed = True
                return
            arms.warmed = False
            arms.ratios.append(math.log((tokens / seconds) / (arms.leader_tokens / arms.leader_seconds)))
            arms.leader_tokens, arms.leader_seconds, arms.leader_steps = 0, 0.0, 0
            self._decide(i + 1, arms)

    def _restart(self, b: int, arms: _Arms) -> None:
        """New requests only: back to calibration's choice, with no evidence and frequent probes."""
        log.info("batch %d: new requests; back to the calibrated budget %d (was serving %d)", b,
                 arms.calibrated, arms.leader)
        arms.leader, arms.probe = arms.calibrated, arms.leader
        arms.ratios.clear()
        arms.interval = self.min_interval
        arms.leader_tokens, arms.leader_seconds, arms.leader_steps, arms.warmed = 0, 0.0, 0, False

    def _decide(self, b: int, arms: _Arms) -> None:
        n = len(arms.ratios)
        if n < self.min_pairs:
            return
        m = statistics.fmean(arms.ratios)
        se = statistics.stdev(arms.ratios) / math.sqrt(n)
        edge = math.log(1 + self.margin) if arms.probe else 0.0        # what the probe must win by
        if m > edge + (self.z_tree if arms.probe else self.z_plain) * se:
            log.info("batch %d: budget %d committed %.2fx the tokens per second of budget %d over the last "
                     "%d paired steps (standard error %.2f); serving %d", b, arms.probe, math.exp(m),
                     arms.leader, n, se, arms.probe)
            arms.leader, arms.probe = arms.probe, arms.leader
            arms.ratios.clear()
            arms.interval = self.min_interval
        elif m + self.z_tree * se < math.log(1 - self.clearly_worse):  # far behind: probe 4x as rarely
            arms.interval = min(4 * arms.interval, 4 * self.max_interval)
        elif m <= edge:                                                 # else: promising, keep probing
            arms.interval = min(2 * arms.interval, self.max_interval)

    def report(self) -> dict[int, dict]:
        """Per batch size with a probe: leader, probe and the paired ratios so far (for benchmarks)."""
        return {b: {"leader": a.leader, "probe": a.probe,
                    "probe_over_leader": [round(math.exp(r), 4) for r in a.ratios]}
                for b, a in enumerate(self.arms, start=1) if a is not None}

    def policy(self) -> BudgetPolicy:
        """The leaders as a fixed policy."""
        return BudgetPolicy(tuple(self.budget(b) for b in range(1, len(self.arms) + 1)))

    def table(self) -> dict[int, int]:
        return self.policy().table()

    def describe(self) -> str:
        probes = ", ".join(f"{b}: {a.probe}" for b, a in enumerate(self.arms, start=1) if a is not None)
        return self.policy().describe() + (f" (checked on served steps against {probes})" if probes else "")
