"""Per-request block tables over a shared ``BlockPool`` (torch-free bookkeeping).

A request owns enough slots for its committed tokens plus any lookahead slots a
draft tree needs this step; ``trim`` gives back blocks past what it keeps.

With prefix caching, every full block of committed tokens is registered under a chain hash
(SHA-256 of the previous block's hash and this block's token ids, so equal hashes mean equal
prefixes), and a new request starts from the longest run of cached blocks matching its tokens.
Shared blocks are only ever read: a request writes KV at positions >= its committed length
(prefill chunks, tree tokens, accepted-path compaction), and a registered block lies entirely
below it, so no copy-on-write is needed.
"""

from __future__ import annotations

import hashlib
from array import array

from server.cache.block_pool import BlockPool


def blocks_needed(num_slots: int, block_size: int) -> int:
    return -(-num_slots // block_size)


class KVManager:
    def __init__(self, pool: BlockPool, prefix_caching: bool = False):
        self.pool = pool
        self.block_size = pool.block_size
        self.prefix_caching = prefix_caching
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[bytes]] = {}      # chain hashes of each request's full committed blocks

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
        """Release the request's blocks, last first: a cached prefix is evicted from its tail."""
        self.pool.free(self.tables.pop(request_id, [])[::-1])
        self.hashes.pop(request_id, None)

    def block_hash(self, parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()

    def match_prefix(self, request_id: str, token_ids: list[int]) -> int:
        """Start a request with no blocks from the cached blocks matching its tokens (all but the last,
        which must be fed); returns the number of tokens whose KV it now has."""
        if not self.prefix_caching or self.tables.get(request_id):
            return 0
        bs, table, hashes = self.block_size, [], []
        parent = b""
        for i in range((len(token_ids) - 1) // bs):
            parent = self.block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self.pool.take_cached(parent)
            if block is None:
                break
            table.append(block)
            hashes.append(parent)
        self.tables[request_id], self.hashes[request_id] = table, hashes
        return len(table) * bs

    def cache_blocks(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register the request's blocks that ``num_computed`` committed tokens have filled."""
        if not self.prefix_caching:
            return
        bs, table = self.block_size, self.tables[request_id]
        hashes = self.hashes.setdefault(request_id, [])
        for i in range(len(hashes), num_computed // bs):
            hashes.append(self.block_hash(hashes[-1] if hashes else b"", token_ids[i * bs:(i + 1) * bs]))
            self.pool.register(table[i], hashes[-1])
