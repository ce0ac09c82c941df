"""Tree-attention kernel microbenchmark: the Triton backend against SDPA and flash-attn.

Usage: python -m bench.kernel_attn --device cuda --out bench/results/kernel_attn_<gpu>.json
       python -m bench.kernel_attn --device cpu --out /tmp/kernel_attn_smoke.json   (tiny, TRITON_INTERPRET=1)

Attention alone, one layer, Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128), bf16, paged
KV cache (block size 16, shuffled block ids): a 64-token draft tree over a 4k-token context and a
one-token decode row at the same context, at batch 1 and 16. Methods, each checked against the fp32
reference before it is timed:

- ``triton``: ``TritonBackend.attend`` (one launch, two when the context is split; metadata and work list
  prepared once per step, outside the timing), with the default tile and split choice, then unsplit
  (``[splits=1]``), then a sweep of ``block_q`` x ``block_n``;
- ``reference``: ``ReferenceBackend.attend``, i.e. gather every sequence's context out of the paged
  cache, then SDPA with a dense ``[B, 1, Qmax, L]`` mask (the pure PyTorch path);
- ``sdpa_pregathered``: the same SDPA with the context already contiguous (no gather): SDPA's own cost;
- ``flash_prefix_only`` (only when ``flash_attn`` imports): ``flash_attn_with_kvcache`` over a contiguous
  copy of the committed prefix, without the tree tokens: a lower bound, not a full tree attention.

CUDA timings (see ``timed``): events around each call after a warmup, L2 flushed before each call, the
median (and p10/p90) of the repeats; and, except for ``reference`` (its boolean-mask indexing syncs),
the per-call time when replayed from a CUDA graph with a warm L2. Recorded with the device name, versions, command and date. ``--device cpu`` runs tiny shapes under
the Triton interpreter: a smoke test of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from drafters.tree import DraftTree
from kernels.metadata import SeqAttention
from kernels.reference import ReferenceBackend, padded_gather


def random_parents(n: int, rng: np.random.Generator) -> list[int]:
    """A random draft tree of ``n`` nodes in parent-before-child order (-1: child of the root)."""
    return [-1] + [int(rng.integers(-1, i)) for i in range(1, n)]


def ancestor_mask(parents: list[int]) -> np.ndarray:
    """``[n, n]`` bool ancestor-or-self mask of a tree given its parent indices (the drafters' own)."""
    n = len(parents)
    return DraftTree((0,) * n, parents, (0.0,) * n).ancestor_mask(include_root=False)


@dataclass
class Case:
    """A random batch over a paged cache: new tokens' queries/keys/values and the caches they join."""

    seqs: list[SeqAttention]
    q: torch.Tensor        # [T, H, D]
    k_new: torch.Tensor    # [T, Hkv, D]
    v_new: torch.Tensor    # [T, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]


def make_case(specs: list[tuple[int, int, str]], *, block_size: int, heads: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str, seed: int = 0, spare_blocks: int = 3) -> Case:
    """``specs``: ``(prefix_len, num_new, kind)`` per sequence, kind ``"causal"`` or ``"tree"`` (random
    parents). Block ids are a random permutation of the pool (plus ``spare_blocks`` never used)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(p + n) // block_size) for p, n, _ in specs]
    ids = rng.permutation(sum(need) + spare_blocks).tolist()
    seqs, at = [], 0
    for (prefix, num_new, kind), blocks in zip(specs, need):
        mask = ancestor_mask(random_parents(num_new, rng)) if kind == "tree" else None
        seqs.append(SeqAttention(ids[at:at + blocks], prefix, num_new, mask))
        at += blocks
    total = sum(n for _, n, _ in specs)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cache = (len(ids), block_size, kv_heads, head_dim)
    return Case(seqs, randn(total, heads, head_dim), randn(total, kv_heads, head_dim),
                randn(total, kv_heads, head_dim), randn(*cache), randn(*cache))


def timed(fn, *, device: torch.device, warmup: int, repeats: int, graph: bool = True) -> dict:
    """Median / p10 / p90 microseconds of one ``fn()``. On CUDA: events around each call, with the L2
    cache flushed (a 256 MiB write) just before, which also keeps the launch off the measured span;
    plus ``graph_hot_us``, the per-call time of a CUDA graph of 10 back-to-back calls (L2 warm, no launch
    cost: what a graph-captured verify step pays when its KV fits in L2) when ``graph``. Elsewhere:
    perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    stats = {"median_us": statistics.median(times), "p10_us": times[len(times) // 10],
             "p90_us": times[min(len(times) - 1, (9 * len(times)) // 10)], "repeats": repeats}
    if flush is not None and graph:
        stats["graph_hot_us"] = graph_timed(fn, repeats)
    return stats


def graph_timed(fn, repeats: int, calls: int = 10) -> float | str:
    """Median per-call microseconds of ``calls`` calls of ``fn`` replayed from one CUDA graph (or why not)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        return f"not capturable: {e}"
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / calls)
    return statistics.median(times)


def sdpa_pregathered(case: Case, scale: float):
    """SDPA over contiguous, already gathered K/V with the reference's dense mask (GQA folded as there)."""
    offsets = np.concatenate([[0], np.cumsum([s.num_new for s in case.seqs])]).tolist()
    pad = padded_gather(case.seqs, offsets, case.k_cache.shape[1], case.q.device)
    kv_heads, head_dim = case.k_cache.shape[-2:]
    batch, l_max = pad.kv_index.shape
    q_max = pad.query_valid.shape[1]
    group = case.q.shape[1] // kv_heads
    q = (case.q if pad.rows is None else case.q[pad.rows]).view(batch, q_max, -1, head_dim)  # [B, Qmax, H, D]
    q = q.view(batch, q_max, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * q_max, head_dim).contiguous()         # [B, Hkv, group*Qmax, D]
    flat = pad.kv_index.view(-1)
    k = case.k_cache.view(-1, kv_heads, head_dim)[flat].view(batch, l_max, kv_heads, head_dim)
    v = case.v_cache.view(-1, kv_heads, head_dim)[flat].view(batch, l_max, kv_heads, head_dim)
    k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()        # [B, Hkv, L, D]
    mask = None if pad.attn_mask is None else pad.attn_mask.repeat(1, 1, group, 1)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flash_prefix_only(case: Case, scale: float):
    """``flash_attn_with_kvcache`` of the new tokens over their committed prefix only (no tree part),
    from a contiguous copy of the prefix; None when flash-attn is not importable or the batch is ragged."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    lens = {s.num_new for s in case.seqs}
    if len(lens) != 1:
        return None
    num_new = lens.pop()
    kv_heads, head_dim = case.k_cache.shape[-2:]
    block_size = case.k_cache.shape[1]
    batch = len(case.seqs)
    prefix = [s.prefix_len for s in case.seqs]
    l_max = max(prefix)
    k = case.k_cache.new_zeros(batch, l_max, kv_heads, head_dim)                 # [B, L, Hkv, D]
    v = torch.zeros_like(k)
    for b, s in enumerate(case.seqs):
        pos = torch.arange(s.prefix_len, device=k.device)
        blocks = torch.tensor(s.block_table, device=k.device)[pos // block_size]
        k[b, :s.prefix_len] = case.k_cache[blocks, pos % block_size]
        v[b, :s.prefix_len] = case.v_cache[blocks, pos % block_size]
    q = case.q.view(batch, num_new, *case.q.shape[1:])                          # [B, n, H, D]
    seqlens = torch.tensor(prefix, dtype=torch.int32, device=k.device)
    return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, softmax_scale=scale, causal=False)


def run_scenario(label: str, specs, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from kernels.triton_tree_attn import TritonBackend

    case = make_case(specs, block_size=args.block_size, heads=args.heads, kv_heads=args.kv_heads,
                     head_dim=args.head_dim, dtype=dtype, device=device, seed=len(specs))
    scale = args.head_dim ** -0.5
    ref = ReferenceBackend(args.block_size, device)
    ref_meta = ref.build_metadata(case.seqs)
    ref.write_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, ref_meta)
    want = ref.attend(case.q.float(), case.k_cache.float(), case.v_cache.float(), ref_meta, scale)   # [T, H, D]
    base = {"scenario": label, "batch": len(specs), "context": specs[0][0] + specs[0][1],
            "new_tokens_per_seq": specs[0][1]}
    rows = []

    def record(method: str, fn, out=None, graph: bool = True, **extra) -> None:
        err = None if out is None else float((out.float() - want).abs().max())
        stats = timed(fn, device=device, warmup=args.warmup, repeats=args.repeats, graph=graph)
        rows.append({**base, "method": method, **extra, "max_abs_err_vs_fp32_ref": err, **stats})
        print(f"{label:>8} b={len(specs):<3} {method:<32} {stats['median_us']:10.1f} us  "
              f"graph={stats.get('graph_hot_us')}  err={err}", flush=True)

    configs = [(None, 64, None), (None, 64, 1)] + [(bq, bn, None) for bq in args.sweep_block_q
                                                    for bn in args.sweep_block_n]
    for block_q, block_n, split in configs:
        tri = TritonBackend(args.block_size, device, block_q=block_q, block_n=block_n, split_kv=split)
        meta = tri.build_metadata(case.seqs)
        name = ("triton" if block_q is None else f"triton[block_q={block_q},block_n={block_n}]") + (
            "[splits=1]" if split == 1 else "")
        out = tri.attend(case.q, case.k_cache, case.v_cache, meta, scale)
        tiles = meta.backend_data.work.shape[0]
        record(name, lambda tri=tri, meta=meta: tri.attend(case.q, case.k_cache, case.v_cache, meta, scale), out,
               block_q=meta.backend_data.block_q, block_n=block_n, query_tiles=tiles,
               splits=tri.splits(tiles * args.kv_heads, meta.block_tables.shape[1] * args.block_size))
    record("reference", lambda: ref.attend(case.q, case.k_cache, case.v_cache, ref_meta, scale),
           ref.attend(case.q, case.k_cache, case.v_cache, ref_meta, scale), graph=False)
    record("sdpa_pregathered", sdpa_pregathered(case, scale))
    flash = flash_prefix_only(case, scale)
    if flash is not None:
        record("flash_prefix_only", flash, note="lower bound: committed prefix only, contiguous cache, no tree")
    return rows


def versions() -> dict:
    import triton

    try:
        import flash_attn
        flash = flash_attn.__version__
    except ImportError:
        flash = None
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "triton": triton.__version__, "flash_attn": flash,
            "cuda_runtime": torch.version.cuda, "device_name": torch.cuda.get_device_name(0) if cuda else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the smoke run)")
        args.heads, args.kv_heads, args.head_dim, args.block_size = 32, 8, 128, 16
        context, tree, batches, dtype = 4096, 64, (1, 16), torch.bfloat16
        args.sweep_block_q, args.sweep_block_n = (4, 8, 16), (32, 64)
        args.warmup = 10 if args.warmup is None else args.warmup
        args.repeats = 50 if args.repeats is None else args.repeats
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton's first import (in run_scenario)
        args.heads, args.kv_heads, args.head_dim, args.block_size = 4, 2, 32, 16
        context, tree, batches, dtype = 48, 8, (1, 2), torch.float32
        args.sweep_block_q, args.sweep_block_n = (4,), (16,)
        args.warmup = 1 if args.warmup is None else args.warmup
        args.repeats = 2 if args.repeats is None else args.repeats
    torch.manual_seed(0)
    rows = []
    for batch in batches:
        rows += run_scenario(f"tree{tree}", [(context - tree, tree, "tree")] * batch, args, device, dtype)
        rows += run_scenario("decode", [(context - 1, 1, "causal")] * batch, args, device, dtype)
    result = {
        "benchmark": "kernel_attn",
        "command": shlex.join(["python", "-m", "bench.kernel_attn", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, **versions(), "smoke_only": device.type != "cuda",
        "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "block_size": args.block_size, "context": context, "tree_tokens": tree, "dtype": str(dtype)},
        "warmup": args.warmup, "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
