"""CUDA-graph bookkeeping that runs anywhere (capture and replay themselves: tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_engine

from server.worker.cuda_graphs import GraphRunner, token_buckets


def test_token_buckets_are_powers_of_two_then_the_maximum():
    assert token_buckets(1) == [1]
    assert token_buckets(8) == [1, 2, 4, 8]
    assert token_buckets(136) == [1, 2, 4, 8, 16, 32, 64, 128, 136]


def test_graphs_need_cuda_and_a_device_only_backend(tiny_pair):
    engine = tiny_engine(tiny_pair[1])
    with pytest.raises(ValueError, match="need --device cuda"):
        engine.runner.enable_cuda_graphs(4, 8, 256)
    with pytest.raises(ValueError, match="cannot be captured"):
        GraphRunner(engine.runner.model, engine.runner.backend, engine.runner.kv_caches, 4, 36, 8, 256, 64)


def test_bucket_fits_tokens_and_sequences(tiny_pair, monkeypatch):
    runner = tiny_engine(tiny_pair[1]).runner
    monkeypatch.setattr(type(runner.backend), "graphable", True)
    graphs = GraphRunner(runner.model, runner.backend, runner.kv_caches, 4, 36, 8, 256, scratch_block=64)
    assert graphs.bucket(1, 1) == 1 and graphs.bucket(1, 9) == 16 and graphs.bucket(4, 36) == 36
    assert graphs.bucket(3, 3) == 4                       # 4 tokens, min(4, 4 seqs) sequences
    assert graphs.bucket(4, 5) == 8 and graphs.bucket(4, 37) is None
    pad = graphs.padding(16)
    assert (pad.seqs, pad.tokens, pad.mask_words, pad.scratch_slot) == (4, 16, 1, 64 * 4)
    assert runner.kv_caches[0][0].shape[0] == 65          # the pool's 64 blocks + the scratch block


def test_padded_metadata_keeps_real_rows_first():
    from kernels import MetadataBuilder, SeqAttention
    from kernels.metadata import Padding

    meta = MetadataBuilder(4).build([SeqAttention([2, 3], 5, 2), SeqAttention([7], 0, 1)], Padding(4, 8, 2, 3, 40))
    assert meta.cu_seqlens_q.tolist() == [0, 2, 3, 3, 3]
    assert meta.seq_lens.tolist() == [7, 1, 0, 0] and meta.prefix_lens.tolist() == [5, 0, 0, 0]
    assert meta.slot_mapping.tolist() == [13, 14, 28, 40, 40, 40, 40, 40]
    assert meta.block_tables.tolist() == [[2, 3, 0], [7, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert meta.tree_masks.shape == (8, 2) and meta.is_tree.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        MetadataBuilder(4).build([SeqAttention([2, 3], 5, 2)], Padding(1, 1, 1, 3, 40))
    assert torch.equal(meta.tree_masks, torch.zeros(8, 2, dtype=torch.int32))
