"""Block pool and per-request block tables."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager


def test_allocate_grow_trim_free():
    kv = KVManager(BlockPool(10, 4))
    assert kv.allocate("a", 5) == kv.block_table("a") and len(kv.block_table("a")) == 2
    kv.allocate("a", 8)
    assert len(kv.block_table("a")) == 2
    kv.allocate("a", 13)  # lookahead slots
    assert len(kv.block_table("a")) == 4 and kv.pool.num_free == 6
    kv.trim("a", 9)       # rejected lookahead released
    assert len(kv.block_table("a")) == 3 and kv.pool.num_free == 7
    kv.free("a")
    assert kv.pool.num_free == 10 and kv.pool.usage == 0.0


def test_exhaustion_is_reported_not_silent():
    kv = KVManager(BlockPool(3, 4))
    assert kv.can_allocate("a", 12) and not kv.can_allocate("a", 13)
    kv.allocate("a", 12)
    assert kv.pool.usage == 1.0
    with pytest.raises(MemoryError):
        kv.allocate("b", 1)


def test_blocks_are_not_shared_between_requests():
    kv = KVManager(BlockPool(8, 2))
    kv.allocate("a", 6)
    kv.allocate("b", 6)
    assert not set(kv.block_table("a")) & set(kv.block_table("b"))


def test_bookkeeping_is_torch_free():
    code = ("import sys, server.cache.kv_manager, server.engine.scheduler, server.engine.request; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
