"""A fixed pool of KV blocks with reference counts and a content-hash cache (no tensors here).

A block is free (no owner, no content worth keeping), in use (``ref > 0``), or cached: no owner, but
it holds the KV of a full block of committed tokens whose chain hash is registered, so a later request
with the same prefix can take it instead of recomputing it (automatic prefix caching). Cached blocks
count as free: allocation takes truly free blocks first, then evicts the least recently released
cached ones.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    """Hands out block ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()   # ref 0 with registered content, LRU first
        self.ref = [0] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 .. 1.0 (cached blocks without an owner are free)."""
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"requested {n} KV blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                del self.by_hash[self.hash_of.pop(block)]
            self.ref[block] = 1
            out.append(block)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unowned blocks become free, or cached if registered."""
        for block in blocks:
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self.hash_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def register(self, block: int, key: bytes) -> None:
        """Record that ``block`` (in use) holds the full block of tokens hashed to ``key``."""
        if key not in self.by_hash and block not in self.hash_of:
            self.by_hash[key] = block
            self.hash_of[block] = key

    def take_cached(self, key: bytes) -> int | None:
        """The block holding ``key``'s tokens, with a new reference to it; None when not cached."""
        block = self.by_hash.get(key)
        if block is None:
            return None
        if self.ref[block] == 0:
            del self._cached[block]
        self.ref[block] += 1
        return block
