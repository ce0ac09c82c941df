"""Backend-neutral attention metadata for one forward over a ragged batch of sequences.

Every sequence contributes ``num_new`` query tokens that sit at KV positions
``prefix_len .. prefix_len + num_new - 1`` of its block table (for a draft tree
these are the lookahead slots). A query may attend to the whole committed prefix
and to the new tokens its mask allows: causal for prefill/decode, the ancestor
mask for draft-tree tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SeqAttention:
    """One sequence's share of a forward pass (torch-free description)."""

    block_table: list[int]
    prefix_len: int                       # KV entries already committed before this pass
    num_new: int                          # query tokens in this pass
    tree_mask: np.ndarray | None = None   # [num_new, num_new] bool ancestor-or-self; None = causal


@dataclass
class AttentionMetadata:
    """Padded gather indices and masks, built once per forward and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] flat KV slot written by each new token
    query_index: torch.Tensor   # [B, Qmax] index into the T new tokens (padding -> 0)
    query_valid: torch.Tensor   # [B, Qmax] bool
    kv_index: torch.Tensor      # [B, Lmax] flat KV slot of each context position (padding -> 0)
    attn_mask: torch.Tensor | None  # [B, 1, Qmax, Lmax] bool, True = may attend; None = attend to all
    context_lens: list[int]     # per sequence, prefix_len + num_new


def slots_for(block_table: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """Flat KV slots of positions [start, stop) of a sequence: int64 [stop - start]."""
    pos = np.arange(start, stop, dtype=np.int64)
    blocks = np.asarray(block_table, dtype=np.int64)[pos // block_size]
    return blocks * block_size + pos % block_size


def build_metadata(seqs: list[SeqAttention], block_size: int, device: torch.device | str = "cpu"
                   ) -> AttentionMetadata:
    """Flatten per-sequence descriptions into the padded tensors the backends consume."""
    num_seqs = len(seqs)
    q_max = max(s.num_new for s in seqs)
    ctx = [s.prefix_len + s.num_new for s in seqs]
    l_max = max(ctx)
    query_index = np.zeros((num_seqs, q_max), dtype=np.int64)
    query_valid = np.zeros((num_seqs, q_max), dtype=bool)
    kv_index = np.zeros((num_seqs, l_max), dtype=np.int64)
    mask = np.zeros((num_seqs, 1, q_max, l_max), dtype=bool)
    slot_chunks = []
    offset = 0
    for b, s in enumerate(seqs):
        n, p = s.num_new, s.prefix_len
        query_index[b, :n] = np.arange(offset, offset + n)
        query_valid[b, :n] = True
        kv_index[b, :ctx[b]] = slots_for(s.block_table, 0, ctx[b], block_size)
        slot_chunks.append(kv_index[b, p:ctx[b]])
        mask[b, 0, :n, :p] = True
        new_mask = s.tree_mask if s.tree_mask is not None else np.tri(n, dtype=bool)
        mask[b, 0, :n, p:ctx[b]] = new_mask
        mask[b, 0, n:, 0] = True  # padded query rows attend somewhere: no NaN rows
        offset += n
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(device),
        query_index=torch.from_numpy(query_index).to(device),
        query_valid=torch.from_numpy(query_valid).to(device),
        kv_index=torch.from_numpy(kv_index).to(device),
        attn_mask=None if mask.all() else torch.from_numpy(mask).to(device),
        context_lens=ctx,
    )
