"""Verify and drafting cost against batch size and tree size, measured on the machine that serves.

``measure_verify_table`` times one target forward (plus the LM head over every tree row, as
verification needs) for ``b`` requests, each a root plus ``n`` tree tokens over a ``context``-token
prefix; ``measure_draft_cost`` times the drafter proposing ``n``-node trees for ``b`` requests at
once. ``server.engine.budget.choose_budgets`` turns the tables into the budget per batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from kernels import SeqAttention
from server.cache.kv_manager import blocks_needed
from server.engine.budget import CostTable
from server.engine.request import SamplingParams
from server.worker.device import now
from server.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)

CALIBRATION_ID = "__calibration__"
MIN_CONTEXT = 16   # a batch size whose requests the KV pool cannot give this much context is skipped


def calibration_ids(batch: int) -> list[str]:
    return [f"{CALIBRATION_ID}{i}" for i in range(batch)]


def fitting_context(runner: ModelRunner, batch: int, max_new: int, context: int) -> int:
    """The longest context, at most ``context``, that ``batch`` requests with ``max_new`` new tokens each
    can hold in the (free) KV pool; 0 when not even ``MIN_CONTEXT`` (or ``context``, if less) fits."""
    kv = runner.kv
    per_request = (kv.pool.num_free // batch) * kv.block_size
    fits = min(context, per_request - max_new)
    return fits if fits >= min(MIN_CONTEXT, context) else 0


@torch.inference_mode()
def _time_verify(runner: ModelRunner, tables: list[list[int]], context: int, n: int) -> float:
    """Seconds of one forward (metadata included) over ``len(tables)`` requests with ``1 + n`` new tokens each."""
    model = runner.model
    mask = np.tri(n + 1, dtype=bool) if n else None               # cost does not depend on the tree's shape
    seqs = [SeqAttention(t, context, n + 1, mask) for t in tables]
    ids = torch.randint(0, model.config.vocab_size, (len(tables) * (n + 1),),
                        generator=torch.Generator().manual_seed(n)).tolist()   # [b * (1 + n)]
    positions = list(range(context, context + n + 1)) * len(tables)
    t = now(runner.device)
    hidden = runner.forward(ids, positions, seqs)                    # [b * (1 + n), hidden]
    model.compute_logits(hidden)                                     # verify: every row; decode: the only one
    return now(runner.device) - t


def _verify_times(runner: ModelRunner, sizes: list[int], context: int, repeats: int, batch: int,
                  warmup: int = 1) -> dict[int, list[float]]:
    """Timed forwards of ``batch`` requests with ``1 + n`` new tokens each over ``context`` committed tokens
    each, per ``n`` in ``sizes``: ``warmup`` untimed rounds, then ``repeats`` timed ones, each round one
    forward per size. Round-robin, so a slow spell of the host lands on every size alike rather than on one
    size's repeats; the warm-up takes first-use costs (a new row count builds its kernels' primitives) out
    of the timed forwards. Frees its KV blocks afterwards. The context's KV is left as the pool holds it
    (zeros at start-up): attention costs the same whatever the values."""
    kv = runner.kv
    need = context + 1 + max(sizes)
    ids = calibration_ids(batch)
    if not kv.pool.can_allocate(batch * blocks_needed(need, kv.block_size)):
        raise RuntimeError(f"KV pool too small to calibrate ({batch} x {need} slots)")
    try:
        tables = [kv.allocate(rid, need) for rid in ids]
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(warmup + repeats):
            for n in sizes:
                times[n].append(_time_verify(runner, tables, context, n))
        return {n: t[warmup:] for n, t in times.items()}
    finally:
        for rid in ids:
            kv.free(rid)


def measure_verify_cost(runner: ModelRunner, sizes: list[int], context: int = 256, repeats: int = 3,
                        batch: int = 1) -> dict[int, float]:
    """Median seconds of a verify forward of ``batch`` requests with ``1 + n`` new tokens each, for each
    ``n`` in ``sizes``, over ``context`` committed tokens each."""
    return {n: float(np.median(t)) for n, t in _verify_times(runner, sizes, context, repeats, batch).items()}


def measure_verify_table(runner: ModelRunner, batches: list[int], sizes: list[int], context: int = 256,
                         repeats: int = 2) -> tuple[CostTable, dict[int, int]]:
    """Verify seconds per (batch size, tree size), the fastest of ``repeats`` after one warm-up round (noise from
    a busy host and first-use set-up only add time), and the context each batch size was
    measured at: shortened where the KV pool cannot hold ``batch`` full contexts; batch sizes that
    cannot get ``MIN_CONTEXT`` tokens each are skipped (both logged)."""
    table, contexts = {}, {}
    for b in batches:
        ctx = fitting_context(runner, b, 1 + max(sizes), context)
        if ctx == 0:
            log.warning("calibration: KV pool too small for %d requests; larger batches use the budget of "
                        "the largest measured one", b)
            break
        if ctx < context:
            log.info("calibration: batch %d measured over %d context tokens per request (KV pool holds %d "
                     "slots)", b, ctx, runner.kv.capacity_tokens)
        table[b] = {n: min(t) for n, t in _verify_times(runner, sizes, ctx, repeats, b).items()}
        contexts[b] = ctx
    if not table:
        raise RuntimeError("KV pool too small to calibrate")
    return table, contexts


def _asks(tokens: dict[str, list[int]], budget: int) -> list[DraftRequest]:
    return [DraftRequest(rid, toks, SamplingParams(), budget) for rid, toks in tokens.items()]


def _commit(drafter: Drafter, tokens: dict[str, list[int]], k: int, width: int, g: torch.Generator,
            device: torch.device, dtype: torch.dtype) -> None:
    """Tell the drafter every calibration request committed ``k`` more tokens (``k - 1`` accepted drafts
    plus the target's next token, as after a verify step), copied from earlier in its own context as a
    copy-heavy request's would be, so prompt lookup finds matches to graft."""
    updates = []
    for rid, toks in tokens.items():
        src = int(torch.randint(0, len(toks) - k, (1,), generator=g))
        new = toks[src:src + k]                                                             # [k]
        features = torch.randn(k, width, generator=g).to(device, dtype)                    # [k, width]
        updates.append(AcceptUpdate(rid, len(toks) - 1, toks[-1:] + new[:-1], features, new[-1]))
        toks.extend(new)
    drafter.on_accept(updates)


@torch.inference_mode()
def measure_draft_cost(drafter: Drafter, hidden_size: int, vocab_size: int, batches: list[int],
                       sizes: list[int], context: int = 256, repeats: int = 2, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32,
                       tau: Callable[[int], float] = lambda n: 1.0) -> CostTable:
    """Seconds of ``drafter.propose`` for ``b`` requests at once (the fastest of ``repeats``), per batch size
    and budget > 0.

    Each request starts from ``context`` random committed tokens with random features (that pass
    is excluded); before every timed call with budget ``n`` each commits ``round(tau(n))`` more
    tokens (``tau``: the drafter's expected tokens per verify step), so the drafter's per-step
    catching up is included at the size it has in serving. All calibration state is released
    afterwards."""
    g = torch.Generator().manual_seed(0)
    tokens = {rid: torch.randint(0, vocab_size, (context + 1,), generator=g).tolist()
              for rid in calibration_ids(max(batches))}
    device = torch.device(device)
    width = hidden_size * (1 + len(drafter.aux_layers))                     # feature rows as the runner's
    features = [torch.randn(context, width, generator=g).to(device, dtype) for _ in tokens]  # [context, width]
    try:
        drafter.on_accept([AcceptUpdate(rid, 0, toks[:-1], f, toks[-1], reset=True)
                           for (rid, toks), f in zip(tokens.items(), features)])
        table: CostTable = {}
        for b in batches:
            batch = dict(list(tokens.items())[:b])
            drafter.propose(_asks(batch, max(sizes)))               # warm-up: runs the new requests' contexts
            table[b] = {}
            for n in (n for n in sizes if n > 0):
                k = max(1, round(tau(n)))
                times = []
                for _ in range(repeats):
                    _commit(drafter, batch, k, width, g, device, dtype)
                    t = now(device)
                    drafter.propose(_asks(batch, n))
                    times.append(now(device) - t)
                table[b][n] = min(times)
        return table
    finally:
        for rid in tokens:
            drafter.release(rid)
