"""The Triton tree-attention kernel equals the PyTorch reference on CUDA at realistic sizes.

A batch of 16: 64-token draft trees over 4k-token contexts, decodes, prefill chunks (with and without a
committed prefix), small and one-node trees; Llama-3-8B attention shape and other GQA ratios and head
dims; fp32 (IEEE dots), bf16 and fp16 against the fp32 reference. Skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.kernel_attn import make_case
from kernels import ReferenceBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only"),
]

BATCH = ([(4032, 64, "tree")] * 4 + [(4095, 1, "causal")] * 4 + [(1024, 128, "causal")] * 2
         + [(0, 128, "causal"), (100, 64, "tree"), (37, 64, "tree"), (2000, 33, "tree"), (3000, 1, "tree"),
            (0, 64, "tree")])
SHAPES = {  # heads, kv_heads, head_dim, block_size
    "llama3_8b": (32, 8, 128, 16),
    "mha_d64": (8, 8, 64, 16),
    "gqa3_d96_bs32": (12, 4, 96, 32),
    "gqa8_d80_bs8": (16, 2, 80, 8),
}
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def run(shape: str, dtype: torch.dtype, batch=BATCH, **options):
    from kernels.triton_tree_attn import TritonBackend

    heads, kv_heads, head_dim, block_size = SHAPES[shape]
    case = make_case(batch, block_size=block_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     dtype=dtype, device="cuda", seed=heads + head_dim)
    backend = TritonBackend(block_size, "cuda", **options)
    meta = backend.build_metadata(case.seqs)
    backend.write_kv(case.k_new, case.v_new, case.k_cache, case.v_cache, meta)
    scale = head_dim ** -0.5
    got = backend.attend(case.q, case.k_cache, case.v_cache, meta, scale)          # [T, H, D]
    ref = ReferenceBackend(block_size, "cuda")
    want = ref.attend(case.q.float(), case.k_cache.float(), case.v_cache.float(), ref.build_metadata(case.seqs),
                      scale)
    return got, want, (backend, case, meta, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(shape, dtype):
    got, want, _ = run(shape, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("block_q,block_n", [(4, 32), (8, 128), (1, 16)])
def test_other_tilings_match_reference(block_q, block_n):
    got, want, _ = run("llama3_8b", torch.bfloat16, block_q=block_q, block_n=block_n)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("split_kv", [None, 1, 7, 16])
def test_split_context_matches_reference(split_kv):
    """A decode and a tree at batch 1-2 leave most SMs idle: the context is split (auto: > 1) and merged."""
    few = [(4095, 1, "causal"), (4032, 64, "tree")]
    got, want, (backend, _, meta, _) = run("llama3_8b", torch.bfloat16, few, split_kv=split_kv)
    splits = backend.splits(meta.backend_data.work.shape[0] * 8, meta.block_tables.shape[1] * 16)
    assert splits == split_kv if split_kv else splits > 1
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_no_host_sync_and_cuda_graph_replay():
    """prepare + attend never wait for the device, and attend replays from a CUDA graph."""
    got, _, (backend, case, meta, scale) = run("llama3_8b", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meta.backend_data = backend.prepare(meta)
        backend.attend(case.q, case.k_cache, case.v_cache, meta, scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.attend(case.q, case.k_cache, case.v_cache, meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(case.q, case.k_cache, case.v_cache, meta, scale)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, got, atol=0, rtol=0)
