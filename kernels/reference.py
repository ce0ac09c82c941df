"""Pure PyTorch attention over the paged KV cache: the ground truth every backend is tested against.

Once per step ``prepare`` pads the ragged batch on the host (numpy): a gather index of every
sequence's context slots and a dense ``[B, 1, Qmax, Lmax]`` mask; each layer then runs one
``scaled_dot_product_attention`` over the gathered keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata, slots_for


@dataclass
class PaddedGather:
    query_index: torch.Tensor       # [B, Qmax] index into the T new tokens (padding -> 0)
    query_valid: torch.Tensor       # [B, Qmax] bool
    kv_index: torch.Tensor          # [B, Lmax] flat KV slot of each context position (padding -> 0)
    attn_mask: torch.Tensor | None  # [B, 1, Qmax, Lmax] bool, True = may attend; None = attend to all


def padded_gather(meta: AttentionMetadata, device: torch.device) -> PaddedGather:
    seqs, block_size = meta.seqs, meta.block_size
    num_seqs, q_max = len(seqs), meta.max_query_len
    ctx = meta.context_lens
    l_max = max(ctx)
    query_index = np.zeros((num_seqs, q_max), dtype=np.int64)
    query_valid = np.zeros((num_seqs, q_max), dtype=bool)
    kv_index = np.zeros((num_seqs, l_max), dtype=np.int64)
    mask = np.zeros((num_seqs, 1, q_max, l_max), dtype=bool)
    offset = 0
    for b, s in enumerate(seqs):
        n, p = s.num_new, s.prefix_len
        query_index[b, :n] = np.arange(offset, offset + n)
        query_valid[b, :n] = True
        kv_index[b, :ctx[b]] = slots_for(s.block_table, 0, ctx[b], block_size)
        mask[b, 0, :n, :p] = True
        mask[b, 0, :n, p:ctx[b]] = s.tree_mask if s.tree_mask is not None else np.tri(n, dtype=bool)
        mask[b, 0, n:, 0] = True  # padded query rows attend somewhere: no NaN rows
        offset += n
    return PaddedGather(
        query_index=torch.from_numpy(query_index).to(device),
        query_valid=torch.from_numpy(query_valid).to(device),
        kv_index=torch.from_numpy(kv_index).to(device),
        attn_mask=None if mask.all() else torch.from_numpy(mask).to(device),
    )


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def prepare(self, meta: AttentionMetadata) -> PaddedGather:
        return padded_gather(meta, self.device)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Grouped-query attention folds each KV group's query heads into extra query rows
        (``[B, Hkv, group * Qmax, D]``), so keys and values are never repeated."""
        pad: PaddedGather = meta.backend_data if meta.backend_data is not None else padded_gather(meta, q.device)
        num_kv_heads, head_dim = k_cache.shape[-2:]
        batch, l_max = pad.kv_index.shape
        group = q.shape[1] // num_kv_heads
        single = batch == 1
        qp = q.unsqueeze(0) if single else q[pad.query_index]                      # [B, Qmax, H, D]
        q_max = qp.shape[1]
        qp = qp.view(batch, q_max, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qp = qp.reshape(batch, num_kv_heads, group * q_max, head_dim)              # [B, Hkv, group*Qmax, D]
        flat = pad.kv_index.view(-1)
        k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat).to(q.dtype)
        v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat).to(q.dtype)
        k = k.view(batch, l_max, num_kv_heads, head_dim).transpose(1, 2)           # [B, Hkv, Lmax, D]
        v = v.view(batch, l_max, num_kv_heads, head_dim).transpose(1, 2)
        mask = None if pad.attn_mask is None else pad.attn_mask.repeat(1, 1, group, 1)  # [B, 1, group*Qmax, Lmax]
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, group*Qmax, D]
        out = out.view(batch, num_kv_heads, group, q_max, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(batch, q_max, num_kv_heads * group, head_dim)            # [B, Qmax, H, D]
        return out[0] if single else out[pad.query_valid]                          # [T, H, D]
