"""Pure PyTorch attention over the paged KV cache: the ground truth for every backend.

Cache layout per layer: ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Store the new tokens' keys/values ``[T, Hkv, D]`` at ``meta.slot_mapping``."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """Masked attention of new queries ``[T, H, D]`` over their sequences' paged context -> ``[T, H, D]``.

    Grouped-query attention is computed by folding each KV group's query heads into extra
    query rows (``[B, Hkv, group * Qmax, D]``), so keys and values are never repeated.
    """
    num_kv_heads, head_dim = k_cache.shape[-2:]
    batch, l_max = meta.kv_index.shape
    group = q.shape[1] // num_kv_heads
    single = batch == 1
    qp = q.unsqueeze(0) if single else q[meta.query_index]                    # [B, Qmax, H, D]
    q_max = qp.shape[1]
    qp = qp.view(batch, q_max, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    qp = qp.reshape(batch, num_kv_heads, group * q_max, head_dim)              # [B, Hkv, group*Qmax, D]
    flat = meta.kv_index.view(-1)
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, flat)
    k = k.view(batch, l_max, num_kv_heads, head_dim).transpose(1, 2)           # [B, Hkv, Lmax, D]
    v = v.view(batch, l_max, num_kv_heads, head_dim).transpose(1, 2)
    mask = None if meta.attn_mask is None else meta.attn_mask.repeat(1, 1, group, 1)  # [B, 1, group*Qmax, Lmax]
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, group*Qmax, D]
    out = out.view(batch, num_kv_heads, group, q_max, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(batch, q_max, num_kv_heads * group, head_dim)            # [B, Qmax, H, D]
    return out[0] if single else out[meta.query_valid]                         # [T, H, D]


def copy_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Move KV entries from flat slots ``src [n]`` to ``dst [n]`` (accepted-path compaction)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, num_kv_heads, head_dim)
        flat.index_copy_(0, dst, flat.index_select(0, src))
