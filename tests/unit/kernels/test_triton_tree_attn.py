"""The Triton tree-attention kernel equals the PyTorch reference, on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (triton 3.9 wraps its own standard
library at import), and in a full pytest run other modules import triton (through transformers) long
before this one is collected. So the kernel cases run in one fresh process: the ``outputs`` fixture
starts this file as a script with ``TRITON_INTERPRET=1``; it runs every case of ``CASES`` and saves
the kernel's and the reference's outputs, which the tests here compare. The work-list tests launch
nothing and run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from bench.kernel_attn import make_case
from kernels import ReferenceBackend
from kernels.metadata import Padding

MIXED = [(37, 40, "tree"),      # 40 nodes: masks span 2 words
         (20, 1, "causal"),     # decode
         (0, 21, "causal"),     # first prefill chunk
         (33, 5, "causal"),     # later prefill chunk
         (0, 6, "tree"),        # tree with no committed prefix
         (5, 1, "tree")]        # one-node tree
DECODES = [(0, 1, "causal"), (16, 1, "causal"), (45, 1, "causal")]

# name: (specs, dtype, heads, kv_heads, head_dim, block_size, backend options)
CASES = {
    "fp32_gqa1_d64": (MIXED, "float32", 2, 2, 64, 16, {}),
    "fp32_gqa2_d48": (MIXED, "float32", 4, 2, 48, 16, {}),
    "fp32_gqa3_d64_bs8": (MIXED, "float32", 3, 1, 64, 8, {}),
    "fp32_gqa4_d96_bs32": (MIXED, "float32", 4, 1, 96, 32, {}),
    "fp32_gqa8_d32_bs4": (MIXED, "float32", 8, 1, 32, 4, {}),
    "fp32_small_tiles": (MIXED, "float32", 4, 2, 64, 16, {"block_q": 4, "block_n": 16}),
    "fp32_decodes": (DECODES, "float32", 4, 1, 64, 16, {}),
    "fp32_unordered_masks": (MIXED, "float32", 2, 1, 32, 16, {"random_masks": True}),
    "bf16_gqa4_d64": (MIXED, "bfloat16", 8, 2, 64, 16, {}),
    "bf16_gqa2_d48": (MIXED, "bfloat16", 4, 2, 48, 16, {"block_q": 8, "block_n": 32}),
    "fp16_gqa2_d64": (MIXED, "float16", 2, 1, 64, 16, {}),
    "fp32_padded_for_cuda_graphs": (MIXED, "float32", 4, 2, 64, 16, {"padded": True}),
    "fp32_split3": (MIXED, "float32", 4, 2, 64, 16, {"split_kv": 3, "block_n": 16}),
    "fp32_split16_decodes": (DECODES, "float32", 4, 1, 64, 16, {"split_kv": 16, "block_n": 16}),
    "bf16_split4_gqa4": (MIXED, "bfloat16", 8, 2, 64, 16, {"split_kv": 4}),
    "fp32_split5_padded": (MIXED, "float32", 4, 2, 64, 16, {"split_kv": 5, "block_n": 16, "padded": True}),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}


def run_case(name: str) -> dict:
    """Kernel vs reference on one case (runs in the interpreter process)."""
    from kernels.triton_tree_attn import TritonBackend

    specs, dtype, heads, kv_heads, head_dim, block_size, options = CASES[name]
    options = dict(options)
    random_masks = options.pop("random_masks", False)
    padded = options.pop("padded", False)
    case = make_case(specs, block_size=block_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     dtype=getattr(torch, dtype), device="cpu", seed=len(name))
    if random_masks:
        rng = np.random.default_rng(1)
        for s in case.seqs:
            if s.tree_mask is not None:
                s.tree_mask = rng.random(s.tree_mask.shape) < 0.4
                np.fill_diagonal(s.tree_mask, True)
    backend = TritonBackend(block_size, **options)
    # a larger step first: its buffers (metadata and work list) are reused, so this step's block table
    # and mask views are non-contiguous
    backend.build_metadata(make_case([(30 * block_size, 70, "tree")] * 7, block_size=block_size, heads=1,
                                     kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu").seqs)
    q, k_new, v_new = case.q, case.k_new, case.v_new
    if padded:   # the shapes a CUDA graph bucket fixes: extra empty sequences, extra tokens to a scratch block
        used = {b for s in case.seqs for b in s.block_table}
        scratch = min(set(range(case.k_cache.shape[0])) - used)
        width = max(len(s.block_table) for s in case.seqs) + 2
        meta = backend.builder.build(case.seqs, Padding(len(case.seqs) + 3, q.shape[0] + 13, 2, width,
                                                        scratch * block_size))
        meta.backend_data = backend.prepare(meta)
        q, k_new, v_new = (torch.cat([t, torch.randn(13, *t.shape[1:], dtype=t.dtype)]) for t in (q, k_new, v_new))
    else:
        meta = backend.build_metadata(case.seqs)
    backend.write_kv(k_new, v_new, case.k_cache, case.v_cache, meta)
    scale = head_dim ** -0.5
    got = backend.attend(q, case.k_cache, case.v_cache, meta, scale)[:case.q.shape[0]]
    ref = ReferenceBackend(block_size)
    want = ref.attend(case.q.float(), case.k_cache.float(), case.v_cache.float(), ref.build_metadata(case.seqs),
                      scale)
    return {"got": got, "want": want, "contiguous": [meta.block_tables.is_contiguous(),
                                                     meta.tree_masks.is_contiguous()]}


def worker(out: str) -> None:
    import triton

    assert triton.knobs.runtime.interpret, "the worker must run with TRITON_INTERPRET=1"
    torch.save({name: run_case(name) for name in CASES}, out)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_interp") / "outputs.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, str(out)], check=False, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(outputs, name):
    res = outputs[name]
    assert res["contiguous"] == [False, False]
    got, want = res["got"], res["want"]
    assert got.dtype == getattr(torch, CASES[name][1]) and got.shape == want.shape
    tol = TOLERANCE[CASES[name][1]]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_work_list_covers_every_query_once():
    from kernels.triton_tree_attn import TritonBackend

    seqs = make_case([(3, 40, "tree"), (9, 1, "causal"), (0, 21, "causal"), (0, 5, "tree")], block_size=16,
                     heads=1, kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu").seqs
    plan = TritonBackend(16).build_metadata(seqs).backend_data
    assert plan.block_q == 16                                   # 67 tokens / 4 sequences -> 16
    assert plan.work.tolist() == [[0, 0], [0, 16], [0, 32], [1, 0], [2, 0], [2, 16], [3, 0]]
    plan = TritonBackend(16, block_q=8).build_metadata(seqs[:1] + seqs[3:]).backend_data
    assert plan.work.tolist() == [[0, 0], [0, 8], [0, 16], [0, 24], [0, 32], [1, 0], [-1, 0]]   # one idle


def test_decode_batches_use_one_query_per_tile_and_reuse_buffers():
    from kernels.triton_tree_attn import TritonBackend

    backend = TritonBackend(16)
    big = make_case([(5, 30, "causal")] * 8, block_size=16, heads=1, kv_heads=1, head_dim=1,
                    dtype=torch.float32, device="cpu").seqs
    first = backend.build_metadata(big).backend_data.work
    decodes = make_case([(7, 1, "causal")] * 3, block_size=16, heads=1, kv_heads=1, head_dim=1,
                        dtype=torch.float32, device="cpu").seqs
    plan = backend.build_metadata(decodes).backend_data
    assert plan.block_q == 1 and plan.work.tolist() == [[0, 0], [1, 0], [2, 0]]
    assert plan.work.data_ptr() == first.data_ptr()             # persistent buffer, not reallocated


def test_context_splits_fill_the_gpu_only_when_programs_are_few():
    from kernels.triton_tree_attn import MAX_SPLITS, TritonBackend

    assert TritonBackend(16).splits(3, 8192) == 1                        # off CUDA: one pass, unless forced
    assert TritonBackend(16, split_kv=4).splits(3, 8192) == 4
    backend = TritonBackend(16)
    backend._sms = 132                                                  # an H100's SM count
    assert backend.splits(3, 8192) == MAX_SPLITS                        # SmolLM2 decode at batch 1: 3 programs
    assert backend.splits(96, 8192) == 3                                # batch 32: 96 programs -> 264 / 96
    assert backend.splits(264, 8192) == 1                               # already two programs per SM
    assert backend.splits(3, 256) == 2                                  # short contexts: >= 2 KV tiles a split
    with pytest.raises(ValueError, match="split_kv"):
        TritonBackend(16, split_kv=MAX_SPLITS + 1)


def test_rejects_non_power_of_two_pages():
    from kernels.triton_tree_attn import TritonBackend

    with pytest.raises(ValueError, match="power of two"):
        TritonBackend(12)


if __name__ == "__main__":
    worker(sys.argv[1])
