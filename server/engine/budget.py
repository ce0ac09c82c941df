"""Draft-tree budget per running-batch size (torch-free): the policy the scheduler applies every step.

Start-up calibration (``server/worker/calibrate.py``) measures the seconds of one verify forward
and of drafting for ``b`` requests with ``n``-node trees each, on a grid from ``calibration_grid``.
``choose_budgets`` turns those tables (after ``monotone`` takes timing noise out of them) and the
drafter's acceptance profile ``tau(n)`` into a ``BudgetPolicy``: for every batch size ``b`` the
budget maximising committed tokens per second, ``b * tau(n) / (verify(b, n) + draft(b, n))``,
among the measured tree sizes. With a measured profile, ``n = 0`` (plain decoding,
``b / verify(b, 0)``) is a candidate too, so speculation is never predicted slower than plain
decoding. Costs between measured batch sizes are interpolated linearly in ``b``; beyond the
largest measured size they are held, so its budget applies.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CostTable = dict[int, dict[int, float]]   # batch size -> tree size -> seconds per step


@dataclass(frozen=True)
class BudgetPolicy:
    """Draft nodes per request for each number of decoding requests in a step."""

    budgets: tuple[int, ...]   # budgets[b - 1]: the budget when b requests decode; the last one beyond

    @classmethod
    def fixed(cls, budget: int, max_batch: int = 1) -> BudgetPolicy:
        return cls((budget,) * max(1, max_batch))

    def index(self, num_decoding: int) -> int:
        """The table row for this many decoding requests (beyond the table: its last row)."""
        return min(max(num_decoding, 1), len(self.budgets)) - 1

    def budget(self, num_decoding: int) -> int:
        return self.budgets[self.index(num_decoding)]

    def serve(self, num_decoding: int) -> int:
        """This step's budget (a fixed policy serves its table; ``ServedBudgets`` also probes)."""
        return self.budget(num_decoding)

    def observe(self, num_decoding: int, budget: int, tokens: int, seconds: float,
                requests: frozenset[str] = frozenset()) -> None:
        """A served step's result; a fixed policy does not learn from it."""

    def table(self) -> dict[int, int]:
        """Batch size -> budget, for every batch size up to ``max_num_seqs``."""
        return {b: n for b, n in enumerate(self.budgets, start=1)}

    def describe(self) -> str:
        """Runs of equal budget, e.g. ``'batch 1-3: 8, 4-16: 0'``."""
        runs: list[list[int]] = []                                  # [first batch, last batch, budget]
        for b, n in self.table().items():
            if runs and runs[-1][2] == n:
                runs[-1][1] = b
            else:
                runs.append([b, b, n])
        return "batch " + ", ".join(f"{lo}{f'-{hi}' if hi > lo else ''}: {n}" for lo, hi, n in runs)


def calibration_grid(max_num_seqs: int, max_draft_tokens: int) -> tuple[list[int], list[int]]:
    """Batch sizes (powers of two below ``max_num_seqs``, and it) and tree sizes (0, then 4, 8, 16, ...
    below ``max_draft_tokens``, and it) that calibration measures."""
    batches = sorted({2 ** i for i in range(max(max_num_seqs, 1).bit_length()) if 2 ** i < max_num_seqs}
                     | {max_num_seqs})
    sizes = sorted({0, max_draft_tokens} | {2 ** i for i in range(2, max_draft_tokens.bit_length())
                                            if 2 ** i < max_draft_tokens})
    return batches, sizes


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear through ``(xs, ys)`` (``xs`` ascending), held flat outside."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def eagle_penalty_tau(n: int) -> float:
    """EAGLE's auto-tuning rule (``ea_model.py``): larger trees earn ~1% per extra 8 tokens."""
    return 1.0 + 0.0125 * n / 8


def tau_at(n: int, profile: dict[int, float] | None) -> float:
    """Expected tokens committed per verify step with an ``n``-node tree: the measured profile
    interpolated (``tau(0) = 1``: plain decoding; flat beyond the largest measured budget), else
    ``eagle_penalty_tau``."""
    if not profile:
        return eagle_penalty_tau(n)
    points = {0: 1.0, **profile}
    known = sorted(points)
    return interp(n, known, [points[k] for k in known])


def cost_at(table: CostTable, b: int, n: int) -> float:
    """Seconds for ``b`` requests with ``n``-node trees: linear in ``b`` between measured batch sizes,
    held at the nearest measured one outside them."""
    measured = sorted(k for k in table if n in table[k])
    return interp(b, measured, [table[k][n] for k in measured])


def monotone(table: CostTable) -> CostTable:
    """Every cost raised to the largest at a smaller or equal batch size and tree size: more tokens never
    cost less, so a figure below one of those is timing noise (a busy host only ever adds time)."""
    out: CostTable = {}
    for b in sorted(table):
        below = out[max(out)] if out else {}                        # the previous batch size (monotone)
        floor, out[b] = 0.0, {}
        for n in sorted(table[b]):
            floor = out[b][n] = max(floor, table[b][n], below.get(n, 0.0))
    return out


def tree_sizes(verify: CostTable) -> list[int]:
    """Tree sizes measured at every batch size."""
    return sorted(set.intersection(*(set(row) for row in verify.values())))


def rates_at(b: int, verify: CostTable, profile: dict[int, float] | None = None,
             draft: CostTable | None = None) -> dict[int, float]:
    """Predicted committed tokens per second of every candidate budget when ``b`` requests decode.

    Budget 0 (plain decoding) is a candidate only with a measured profile: the heuristic ``tau``
    is no evidence that a tree pays, so without one speculation stays on."""
    rates = {}
    for n in tree_sizes(verify):
        if n == 0 and not profile:
            continue
        seconds = cost_at(verify, b, n) + (cost_at(draft, b, n) if draft and n else 0.0)
        rates[n] = b * tau_at(n, profile) / seconds
    return rates


def choose_budgets(verify: CostTable, profile: dict[int, float] | None = None, draft: CostTable | None = None,
                   max_batch: int | None = None) -> BudgetPolicy:
    """For every batch size 1 .. ``max_batch`` (default: the largest measured) the budget with the best
    predicted rate (ties: the smaller budget). ``verify[b][0]`` is a plain one-token decode."""
    max_batch = max_batch or max(verify)
    budgets = []
    for b in range(1, max_batch + 1):
        rates = rates_at(b, verify, profile, draft)
        budgets.append(max(sorted(rates), key=lambda n: rates[n]))
    return BudgetPolicy(tuple(budgets))


def probe_budgets(verify: CostTable, policy: BudgetPolicy, profile: dict[int, float] | None = None,
                  draft: CostTable | None = None, floor: float = 0.85) -> tuple[int | None, ...]:
    """The alternative ``ServedBudgets`` checks each chosen budget against on served steps: plain
    decoding for a tree, the best predicted tree for plain decoding if it is predicted at least
    ``floor`` times plain decoding's rate (else ``None``: no probing at that batch size)."""
    probes: list[int | None] = []
    for b, chosen in policy.table().items():
        if chosen:
            probes.append(0)
            continue
        rates = rates_at(b, verify, profile, draft)
        trees = [n for n in sorted(rates) if n]
        best = max(trees, key=lambda n: rates[n], default=None)
        probes.append(best if best is not None and 0 in rates and rates[best] >= floor * rates[0] else None)
    return tuple(probes)


def format_table(verify: CostTable, draft: CostTable | None, profile: dict[int, float] | None,
                 policy: BudgetPolicy) -> str:
    """The measured table, one line per batch size: ms of verify + draft per tree size, the budget
    chosen and its predicted speed relative to plain decoding."""
    sizes = tree_sizes(verify)
    head = f"{'batch':>5} | " + " | ".join(f"{f'n={n}':>13}" for n in sizes) + " | budget | vs plain"
    lines = [head]
    for b in sorted(verify):
        cells = []
        for n in sizes:
            d = draft[b].get(n) if draft and n and b in draft else None
            cells.append(f"{1000 * verify[b][n]:6.1f}" + (f" +{1000 * d:5.1f}" if d is not None else " " * 7))
        chosen = policy.budget(b)
        rates = rates_at(b, verify, profile, draft)
        plain = b / verify[b][0] if 0 in verify[b] else math.nan
        lines.append(f"{b:>5} | " + " | ".join(cells) + f" | {chosen:>6} | {rates[chosen] / plain:7.2f}x")
    return "\n".join(lines)


class BudgetLog:
    """Logs the budget in force when it changes, at most once per ``interval`` seconds."""

    def __init__(self, initial: int, interval: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logged, self.interval, self.clock = initial, interval, clock
        self.last = -math.inf

    def note(self, budget: int, num_decoding: int) -> bool:
        """Returns whether it logged."""
        if budget == self.logged:
            return False
        now = self.clock()
        if now - self.last < self.interval:
            return False
        log.info("draft budget now %d nodes per request (%d decoding requests)", budget, num_decoding)
        self.logged, self.last = budget, now
        return True
