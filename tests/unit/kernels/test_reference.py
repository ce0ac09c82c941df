"""Reference paged attention with tree masks equals dense masked attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import ReferenceBackend, SeqAttention, build_metadata, slots_for
from kernels.reference import SHORT_QUERY, ragged_plan

reference = ReferenceBackend(4)


def dense_attention(q, k, v, mask, scale):
    """q [n, H, D], k/v [L, Hkv, D], mask [n, L] bool -> [n, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def tree_mask(parents: list[int]) -> np.ndarray:
    """Ancestor-or-self mask of a tree given parent indices (-1 = attached to the prefix)."""
    n = len(parents)
    m = np.eye(n, dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] |= m[p]
    return m


def test_tree_masks_over_paged_cache_match_dense():
    torch.manual_seed(0)
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    k_cache = torch.randn(32, block_size, kv_heads, dim)
    v_cache = torch.randn(32, block_size, kv_heads, dim)
    # sequence A: prefix 6 + a branching tree; B: prefix 3 + causal chunk of 2; C: prefix 9 + chain
    specs = [
        ([7, 3, 12, 30], 6, [-1, -1, 0, 0, 1, 2]),
        ([5, 0], 3, None),
        ([31, 8, 9], 9, [-1, 0]),
    ]
    seqs = [SeqAttention(t, p, len(par) if par else 2, tree_mask(par) if par else None) for t, p, par in specs]
    meta = build_metadata(seqs, block_size)
    total = sum(s.num_new for s in seqs)
    q = torch.randn(total, heads, dim)
    k_new, v_new = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
    reference.write_kv(k_new, v_new, k_cache, v_cache, meta)
    got = reference.attend(q, k_cache, v_cache, meta, scale=dim ** -0.5)

    offset = 0
    for s in seqs:
        ctx = s.prefix_len + s.num_new
        slots = torch.from_numpy(slots_for(s.block_table, 0, ctx, block_size))
        k = k_cache.view(-1, kv_heads, dim)[slots]
        v = v_cache.view(-1, kv_heads, dim)[slots]
        mask = np.zeros((s.num_new, ctx), dtype=bool)
        mask[:, :s.prefix_len] = True
        mask[:, s.prefix_len:] = s.tree_mask if s.tree_mask is not None else np.tri(s.num_new, dtype=bool)
        want = dense_attention(q[offset:offset + s.num_new], k, v, mask, dim ** -0.5)
        torch.testing.assert_close(got[offset:offset + s.num_new], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, k_cache.view(-1, kv_heads, dim)[slots])
        offset += s.num_new


def test_sibling_branches_do_not_see_each_other():
    """A node's output depends only on its ancestors: perturbing a sibling's KV changes nothing."""
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(8, 4, 1, 4), torch.randn(8, 4, 1, 4)
    seq = SeqAttention([0, 1, 2], 2, 3, tree_mask([-1, -1, 0]))
    meta = build_metadata([seq], 4)
    q = torch.randn(3, 1, 4)
    reference.write_kv(torch.randn(3, 1, 4), torch.randn(3, 1, 4), k_cache, v_cache, meta)
    before = reference.attend(q, k_cache, v_cache, meta, 0.5)
    sibling_slot = int(meta.slot_mapping[1])
    k_cache.view(-1, 1, 4)[sibling_slot] += 10.0
    after = reference.attend(q, k_cache, v_cache, meta, 0.5)
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]])
    assert not torch.allclose(before[1], after[1])


def test_copy_slots_compacts_accepted_path():
    k_cache = torch.arange(2 * 4 * 1 * 2, dtype=torch.float32).view(2, 4, 1, 2)
    v_cache = k_cache.clone() + 100
    src, dst = torch.tensor([5, 7]), torch.tensor([4, 5])
    expect_k = k_cache.view(-1, 1, 2)[src].clone()
    reference.copy_slots(k_cache, v_cache, src, dst)
    torch.testing.assert_close(k_cache.view(-1, 1, 2)[dst], expect_k)
    torch.testing.assert_close(v_cache.view(-1, 1, 2)[dst], expect_k + 100)


LONG = SHORT_QUERY + 9
MIXED = [
    SeqAttention(list(range(12)), 5, 1),                                  # a decode
    SeqAttention(list(range(12, 24)), 0, LONG),                              # a prompt's first chunk
    SeqAttention(list(range(24, 30)), 7, 4, tree_mask([-1, 0, 0, 1])),       # a draft tree
    SeqAttention(list(range(30, 60)), 50, LONG + 3),                         # a later chunk
    SeqAttention(list(range(60, 64)), 2, 3),                                 # a short chunk
]


@pytest.mark.parametrize("seqs", [MIXED, MIXED[:2], MIXED[1:2], MIXED[3:4], MIXED[2:4]])
def test_ragged_batch_with_long_chunks_matches_dense(seqs):
    """Long prefill chunks (from position 0 and after a prefix) attend on their own, beside decodes and a
    tree in the padded group, and every row still equals dense masked attention."""
    torch.manual_seed(2)
    block_size, heads, kv_heads, dim = 4, 6, 2, 8
    k_cache, v_cache = torch.randn(96, block_size, kv_heads, dim), torch.randn(96, block_size, kv_heads, dim)
    meta = build_metadata(seqs, block_size)
    meta.backend_data = plan = ragged_plan(meta, torch.device("cpu"))
    assert [c.num_new for c in plan.chunks] == [s.num_new for s in seqs if s.num_new > SHORT_QUERY]
    for c, s in zip(plan.chunks, [s for s in seqs if s.num_new > SHORT_QUERY]):
        assert (c.attn_mask is None) == (s.prefix_len == 0)                     # no mask from position 0
    if seqs is MIXED:
        assert plan.padded.query_valid.shape[1] == 4                             # padded to the tree, not a chunk
    total = sum(s.num_new for s in seqs)
    q = torch.randn(total, heads, dim)
    reference.write_kv(torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim), k_cache, v_cache, meta)
    got = reference.attend(q, k_cache, v_cache, meta, scale=dim ** -0.5)
    offset = 0
    for s in seqs:
        ctx = s.prefix_len + s.num_new
        slots = torch.from_numpy(slots_for(s.block_table, 0, ctx, block_size))
        mask = np.ones((s.num_new, ctx), dtype=bool)
        mask[:, s.prefix_len:] = s.tree_mask if s.tree_mask is not None else np.tri(s.num_new, dtype=bool)
        want = dense_attention(q[offset:offset + s.num_new], k_cache.view(-1, kv_heads, dim)[slots],
                               v_cache.view(-1, kv_heads, dim)[slots], mask, dim ** -0.5)
        torch.testing.assert_close(got[offset:offset + s.num_new], want, atol=1e-5, rtol=1e-5)
        offset += s.num_new
