"""The attention-backend interface: one object per engine, chosen once for the device.

A backend turns per-sequence descriptions into :class:`AttentionMetadata` (ragged, in
persistent device buffers; ``prepare`` may add what it wants precomputed once per step for
all layers), writes new keys/values into the paged cache, attends, and moves KV entries when
the runner compacts an accepted draft path. Cache layout per layer: ``k_cache``/``v_cache``
``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.metadata import AttentionMetadata, MetadataBuilder, SeqAttention


class AttentionBackend:
    name = "base"
    graphable = False   # True when prepare/attend run on the device alone (CUDA-graph capturable)

    def __init__(self, block_size: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.block_size = block_size
        self.builder = MetadataBuilder(block_size, self.device)

    def build_metadata(self, seqs: list[SeqAttention]) -> AttentionMetadata:
        """Metadata for one forward (valid until the next call: its tensors are views of reused buffers)."""
        meta = self.builder.build(seqs)
        meta.backend_data = self.prepare(meta)
        return meta

    def prepare(self, meta: AttentionMetadata) -> Any:
        """Backend-specific per-step data shared by all layers (none by default)."""
        return None

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Store the new tokens' keys/values ``[T, Hkv, D]`` at ``meta.slot_mapping``."""
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Queries ``[T, H, D]`` over their sequences' paged context (mask per ``meta``) -> ``[T, H, D]``."""
        raise NotImplementedError

    def copy_slots(self, k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move KV entries from flat slots ``src [n]`` to ``dst [n]`` (accepted-path compaction)."""
        num_kv_heads, head_dim = k_cache.shape[-2:]
        for cache in (k_cache, v_cache):
            flat = cache.view(-1, num_kv_heads, head_dim)
            flat.index_copy_(0, dst, flat.index_select(0, src))
