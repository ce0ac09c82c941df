"""Prefix caching: full committed blocks are shared by chain hash, with reference counts and LRU eviction."""

from __future__ import annotations

from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager


def committed(kv, rid, tokens):
    """A request that computed all of ``tokens`` (but the last): its full blocks get registered."""
    kv.allocate(rid, len(tokens))
    kv.cache_blocks(rid, tokens, len(tokens) - 1)


def test_a_shared_prefix_is_matched_block_by_block_and_never_the_last_token():
    kv = KVManager(BlockPool(16, 4), prefix_caching=True)
    a = list(range(100, 114))                    # 14 tokens: blocks [0:4) [4:8) [8:12) full
    committed(kv, "a", a)
    assert kv.match_prefix("b", a[:12] + [7, 8]) == 12 and kv.block_table("b") == kv.block_table("a")[:3]
    assert kv.match_prefix("c", a[:12]) == 8                 # 12 tokens: the last one must be fed
    assert kv.match_prefix("d", a[:4] + [0] + a[5:14]) == 4  # a different token ends the match
    assert kv.match_prefix("e", [0] + a[1:]) == 0            # the chain hash covers every earlier block
    shared = kv.block_table("a")[0]
    assert kv.pool.ref[shared] == 4                          # a, b, c, d


def test_released_blocks_stay_cached_until_evicted_tail_first():
    kv = KVManager(BlockPool(4, 4), prefix_caching=True)
    a = list(range(1, 14))                       # 13 tokens: 3 full blocks and 1 partial
    committed(kv, "a", a)
    kv.free("a")
    assert kv.pool.usage == 0.0 and kv.pool.num_free == 4    # cached blocks count as free
    kv.allocate("x", 8)                          # the partial block (never registered), then a's last block
    assert kv.match_prefix("b", a) == 8
    kv.free("b")
    kv.free("x")
    assert kv.match_prefix("c", a) == 8


def test_caching_off_matches_nothing_and_frees_plainly():
    kv = KVManager(BlockPool(8, 4))
    a = list(range(1, 14))
    committed(kv, "a", a)
    kv.free("a")
    assert kv.match_prefix("b", a) == 0 and kv.pool.num_free == 8


def test_a_block_computed_twice_is_registered_once():
    kv = KVManager(BlockPool(8, 4), prefix_caching=True)
    a = list(range(1, 10))
    committed(kv, "a", a)
    committed(kv, "b", a)                        # computed side by side, before either was cached
    kv.free("b")                                 # b's copies were never registered: plain free blocks
    assert kv.pool.num_free == 5 and kv.match_prefix("c", a) == 8
    assert kv.block_table("c") == kv.block_table("a")[:2]
