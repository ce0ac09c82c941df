"""Ragged attention metadata: packing, layout, persistent buffers, backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import MetadataBuilder, ReferenceBackend, SeqAttention, get_backend, slots_for
from kernels.metadata import pack_mask_rows, unpack_mask_rows


def test_mask_packing_round_trips_across_words():
    rng = np.random.default_rng(0)
    mask = rng.random((5, 70)) < 0.5
    packed = pack_mask_rows(mask, 3)
    assert packed.dtype == np.int32 and packed.shape == (5, 3)
    np.testing.assert_array_equal(unpack_mask_rows(packed, 70), mask)
    np.testing.assert_array_equal((packed[:, 1] >> 3) & 1, mask[:, 35])   # column 35 = word 1, bit 3


def test_ragged_fields_describe_each_sequence():
    seqs = [SeqAttention([4, 2, 9, 11], 20, 5),                                     # prefill chunk
            SeqAttention([7], 3, 1),                                           # decode
            SeqAttention([1, 0, 5], 17, 3, np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=bool))]  # tree
    meta = MetadataBuilder(8).build(seqs)
    assert meta.cu_seqlens_q.tolist() == [0, 5, 6, 9]
    assert meta.prefix_lens.tolist() == [20, 3, 17] and meta.seq_lens.tolist() == [25, 4, 20]
    assert meta.is_tree.tolist() == [0, 0, 1]
    assert meta.block_tables.tolist() == [[4, 2, 9, 11], [7, 0, 0, 0], [1, 0, 5, 0]]
    want_slots = np.concatenate([slots_for(s.block_table, s.prefix_len, s.prefix_len + s.num_new, 8) for s in seqs])
    assert meta.slot_mapping.tolist() == want_slots.tolist()
    np.testing.assert_array_equal(unpack_mask_rows(meta.tree_masks[6:].numpy(), 3), seqs[2].tree_mask)
    assert meta.num_seqs == 3 and meta.num_tokens == 9 and meta.max_query_len == 5 and meta.max_seq_len == 25


def test_buffers_persist_across_steps_and_grow_when_outgrown():
    builder = MetadataBuilder(4)
    first = builder.build([SeqAttention([0, 1], 5, 2)])
    ptrs = {name: buf.data_ptr() for name, buf in builder.buffers.items()}
    second = builder.build([SeqAttention([3, 2], 6, 1), SeqAttention([5], 1, 2)])
    assert {name: buf.data_ptr() for name, buf in builder.buffers.items()} == ptrs     # reused
    assert second.slot_mapping.data_ptr() == first.slot_mapping.data_ptr()
    assert second.block_tables.tolist() == [[3, 2], [5, 0]]
    big = builder.build([SeqAttention(list(range(45)), 150, 30)])                      # outgrows the minimum 16
    assert builder.buffers["slot_mapping"].shape == (32,) and builder.buffers["block_tables"].shape == (16, 45)
    assert big.block_tables.tolist() == [list(range(45))] and big.slot_mapping.tolist() == list(range(150, 180))


def test_block_table_too_short_and_bad_tree_mask_are_refused():
    with pytest.raises(ValueError, match="block table"):
        MetadataBuilder(4).build([SeqAttention([0], 4, 1)])
    with pytest.raises(ValueError, match="tree mask"):
        MetadataBuilder(4).build([SeqAttention([0], 0, 2, np.ones((3, 3), dtype=bool))])


def test_backend_choice():
    assert isinstance(get_backend(16, "cpu"), ReferenceBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_backend(16, "cpu", "nope")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        get_backend(16, "cpu", "triton")


def test_reference_results_do_not_depend_on_buffer_history():
    """Metadata built in reused (strided) buffers gives the same attention as a fresh build."""
    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(16, 4, 2, 8), torch.randn(16, 4, 2, 8)
    seqs = [SeqAttention([3, 7], 5, 2), SeqAttention([9], 0, 3)]
    q = torch.randn(5, 4, 8)
    backend = ReferenceBackend(4)
    backend.build_metadata([SeqAttention(list(range(12)), 40, 6)])                    # wider history
    got = backend.attend(q, k_cache, v_cache, backend.build_metadata(seqs), 0.3)
    fresh = ReferenceBackend(4)
    torch.testing.assert_close(got, fresh.attend(q, k_cache, v_cache, fresh.build_metadata(seqs), 0.3))
