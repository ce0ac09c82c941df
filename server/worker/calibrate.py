"""Verify cost against tree size, measured on the machine that serves, and the tree budget it implies.

``measure_verify_cost`` times one target forward (plus the LM head over every tree row,
as verification needs) for a root plus ``n`` tree tokens over a ``context``-token prefix.
``choose_budget`` picks the budget maximising expected committed tokens per second:
``tau(n) / cost(n)``, with ``tau(n)`` the drafter's measured acceptance profile when one
is known, else EAGLE's ``total_token=-1`` rule of thumb (a small bonus for larger trees).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from kernels import SeqAttention, build_metadata
from server.worker.model_runner import ModelRunner

CALIBRATION_ID = "__calibration__"


@torch.inference_mode()
def measure_verify_cost(runner: ModelRunner, sizes: list[int], context: int = 256, repeats: int = 3
                        ) -> dict[int, float]:
    """Median seconds of a verify forward with ``1 + n`` new tokens, for each ``n`` in ``sizes``."""
    kv, model = runner.kv, runner.model
    need = context + 1 + max(sizes)
    if not kv.can_allocate(CALIBRATION_ID, need):
        raise RuntimeError(f"KV pool too small to calibrate ({need} slots)")
    table = kv.allocate(CALIBRATION_ID, need)
    try:
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
        meta = build_metadata([SeqAttention(table, 0, context)], kv.block_size, runner.device)
        model(ids.to(runner.device), torch.arange(context, device=runner.device), runner.kv_caches, meta)
        costs = {}
        for n in sizes:
            chain = np.tri(n + 1, dtype=bool)                      # cost does not depend on the mask's shape
            meta = build_metadata([SeqAttention(table, context, n + 1, chain)], kv.block_size, runner.device)
            tokens = ids[:n + 1].to(runner.device)
            positions = torch.arange(context, context + n + 1, device=runner.device)
            times = []
            for _ in range(repeats + 1):                           # first run warms up
                t = time.perf_counter()
                model.compute_logits(model(tokens, positions, runner.kv_caches, meta))
                times.append(time.perf_counter() - t)
            costs[n] = float(np.median(times[1:]))
        return costs
    finally:
        kv.free(CALIBRATION_ID)


def eagle_penalty_tau(n: int) -> float:
    """EAGLE's auto-tuning rule (``ea_model.py``): larger trees earn ~1% per extra 8 tokens."""
    return 1.0 + 0.0125 * n / 8


def choose_budget(costs: dict[int, float], tau: dict[int, float] | None = None) -> tuple[int, dict[int, float]]:
    """Budget maximising ``tau(n) / cost(n)``; ``tau`` measured per budget, interpolated, else heuristic."""
    sizes = sorted(costs)
    if tau:
        known = sorted(tau)
        tau_at = {n: float(np.interp(n, known, [tau[k] for k in known])) for n in sizes}
    else:
        tau_at = {n: eagle_penalty_tau(n) for n in sizes}
    rate = {n: tau_at[n] / costs[n] for n in sizes}
    return max(sizes, key=lambda n: rate[n]), rate
