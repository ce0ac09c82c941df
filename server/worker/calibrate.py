"""Verify and drafting cost against tree size, measured on the machine that serves, and the budget they imply.

``measure_verify_cost`` times one target forward (plus the LM head over every tree row,
as verification needs) for a root plus ``n`` tree tokens over a ``context``-token prefix;
``measure_draft_cost`` times the drafter proposing an ``n``-node tree for one request.
``choose_budget`` picks the budget maximising expected committed tokens per second,
``tau(n) / (verify(n) + draft(n))``, with ``tau(n)`` the drafter's measured acceptance profile
when one is known, else EAGLE's ``total_token=-1`` rule of thumb (a small bonus for larger
trees). With a measured profile, plain decoding (budget 0: ``1 / verify(0)``) competes too:
when no tree is predicted to pay for itself on this machine, speculation is switched off.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from kernels import SeqAttention, build_metadata
from server.engine.request import SamplingParams
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


@torch.inference_mode()
def measure_draft_cost(drafter: Drafter, hidden_size: int, vocab_size: int, sizes: list[int], context: int = 256,
                       repeats: int = 3) -> dict[int, float]:
    """Median seconds of ``drafter.propose`` for one request (``context`` random committed tokens with
    random features, context pass excluded) at each budget in ``sizes``."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (context + 1,), generator=g).tolist()
    drafter.on_accept([AcceptUpdate(CALIBRATION_ID, 0, tokens[:-1], torch.randn(context, hidden_size, generator=g),
                                    tokens[-1], reset=True)])
    try:
        costs = {}
        for n in sizes:
            ask = [DraftRequest(CALIBRATION_ID, tokens, SamplingParams(), n)]
            times = []
            for _ in range(repeats + 1):                           # first run warms up (and runs the context)
                t = time.perf_counter()
                drafter.propose(ask)
                times.append(time.perf_counter() - t)
            costs[n] = float(np.median(times[1:]))
        return costs
    finally:
        drafter.release(CALIBRATION_ID)


def choose_budget(costs: dict[int, float], tau: dict[int, float] | None = None,
                  draft: dict[int, float] | None = None) -> tuple[int, dict[int, float]]:
    """Budget maximising ``tau(n) / (costs[n] + draft[n])`` and the rate of every candidate.

    ``tau`` is measured per budget (interpolated between, held flat beyond), else heuristic.
    With a measured ``tau`` and ``costs[0]`` (a plain one-token forward), budget 0 = plain
    decoding is a candidate with rate ``1 / costs[0]``.
    """
    sizes = sorted(n for n in costs if n > 0)
    draft = draft or {}
    if tau:
        known = sorted(tau)
        tau_at = {n: float(np.interp(n, known, [tau[k] for k in known])) for n in sizes}
    else:
        tau_at = {n: eagle_penalty_tau(n) for n in sizes}
    rate = {n: tau_at[n] / (costs[n] + draft.get(n, 0.0)) for n in sizes}
    if tau and 0 in costs:
        rate[0] = 1.0 / costs[0]
    return max(rate, key=lambda n: rate[n]), rate
