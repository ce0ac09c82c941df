"""Per-request block tables over a shared ``BlockPool`` (torch-free bookkeeping).

A request owns enough slots for its committed tokens plus any lookahead slots a
draft tree needs this step; ``trim`` gives back blocks past what it keeps.
"""

from __future__ import annotations

from server.cache.block_pool import BlockPool


def blocks_needed(num_slots: int, block_size: int) -> int:
    return -(-num_slots // block_size)


class KVManager:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[str, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def num_new_blocks(self, request_id: str, num_slots: int) -> int:
        have = len(self.tables.get(request_id, ()))
        return max(0, blocks_needed(num_slots, self.block_size) - have)

    def can_allocate(self, request_id: str, num_slots: int) -> bool:
        return self.pool.can_allocate(self.num_new_blocks(request_id, num_slots))

    def allocate(self, request_id: str, num_slots: int) -> list[int]:
        """Grow the request's table to cover ``num_slots`` positions; returns the table."""
        new = self.pool.allocate(self.num_new_blocks(request_id, num_slots))
        table = self.tables.setdefault(request_id, [])
        table.extend(new)
        return table

    def trim(self, request_id: str, num_slots: int) -> None:
        """Release whole blocks beyond the first ``num_slots`` positions (rejected lookahead)."""
        table = self.tables.get(request_id)
        if table is None:
            return
        keep = blocks_needed(num_slots, self.block_size)
        if len(table) > keep:
            self.pool.free(table[keep:])
            del table[keep:]

    def free(self, request_id: str) -> None:
        self.pool.free(self.tables.pop(request_id, []))
