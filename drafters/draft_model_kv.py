"""The draft model's own paged KV: per-layer cache tensors plus per-request slot tables over a ``BlockPool``.

The pages hold ONE position each (block size 1), so a request's block table is simply the list of
its slots, position by position. That is what lets a draft-tree node be an ordinary one-token
sequence for ``kernels`` metadata: its table is the request's committed slots followed by its
ancestors' scratch slots and its own, so it attends to exactly the committed context and its
ancestors (causally, no tree mask), whichever earlier forward wrote them. Bookkeeping is
``server.cache``'s ``KVManager`` over a ``BlockPool`` of single-slot blocks (no prefix caching).
"""

from __future__ import annotations

import torch

from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.models.llama import LlamaConfig

SLOT = 1   # positions per page


class DraftModelKV:
    """``num_slots`` KV slots for a draft model of ``cfg`` on ``device``; see the module docstring."""

    def __init__(self, cfg: LlamaConfig, num_slots: int, dtype: torch.dtype, device: torch.device | str):
        self.manager = KVManager(BlockPool(num_slots, SLOT))
        shape = (num_slots, SLOT, cfg.num_key_value_heads, cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=device),       # [slots, 1, Hkv, D]
                        torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(cfg.num_hidden_layers)]

    def table(self, request_id: str) -> list[int]:
        """The request's slots, one per position (committed context first, then this step's scratch)."""
        return self.manager.block_table(request_id)

    def reserve(self, request_id: str, positions: int) -> bool:
        """Grow the request's table to ``positions`` slots; False (nothing taken) when the pool cannot."""
        if not self.manager.can_allocate(request_id, positions):
            return False
        self.manager.allocate(request_id, positions)
        return True

    def free(self, request_id: str) -> None:
        self.manager.free(request_id)

    @property
    def num_free(self) -> int:
        return self.manager.pool.num_free
