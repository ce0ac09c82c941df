"""Chunked prefill: one token budget per step, decodes first, chunks that shrink with the context."""

from __future__ import annotations

from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig, chunk_within


def make(tokens=8, pairs=0, num_blocks=64, block_size=4, lookahead=0, min_chunk=2):
    kv = KVManager(BlockPool(num_blocks, block_size))
    config = SchedulerConfig(4, tokens, lookahead, max_prefill_attention=pairs, min_prefill_chunk=min_chunk)
    return Scheduler(config, kv), kv


def req(rid, n):
    return Request(rid, list(range(n)), SamplingParams(max_tokens=50, temperature=0))


def run_chunks(s, r):
    """Schedule until ``r``'s prefill completes; returns its chunk sizes."""
    sizes = []
    while True:
        (x,) = [x for x in s.schedule().scheduled if x.request is r]
        sizes.append(x.num_new_tokens)
        if not x.partial:
            return sizes
        s.advance(x)


def test_a_long_prompt_is_split_and_only_its_last_chunk_emits():
    s, kv = make(tokens=8)
    a = req("a", 21)
    s.add(a)
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.num_new_tokens, x.is_prefill, x.partial) == (8, True, True)
    assert len(kv.block_table("a")) == 2                  # KV for the chunk only, not the whole prompt
    s.advance(x)
    assert a.num_computed_tokens == 8 and a.token_ids == list(range(21))
    assert run_chunks(s, a) == [8, 5]
    s.commit(a, [99])
    assert a.num_computed_tokens == 21 and a.token_ids[-1] == 99


def test_decodes_go_first_and_share_the_budget_with_a_chunk():
    s, _ = make(tokens=8, lookahead=3)
    a, b = req("a", 3), req("b", 30)
    s.add(a)
    s.schedule()
    s.commit(a, [7])
    s.add(b)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens, x.num_lookahead) for x in out.scheduled] == [
        ("a", 1, 3), ("b", 4, 0)]                          # 1 + 3 draft slots for a, the rest for b's chunk
    s.commit(a, [8])
    s.advance(out.scheduled[1])
    out = s.schedule()                                     # b keeps its place after the decode
    assert [x.request.request_id for x in out.scheduled] == ["a", "b"] and out.scheduled[1].partial


def test_chunks_shrink_as_the_context_grows_within_the_attention_budget():
    s, _ = make(tokens=64, pairs=400, min_chunk=2)
    a = req("a", 80)
    s.add(a)
    sizes = run_chunks(s, a)
    assert sum(sizes) == 80 and sizes[0] == 20 and sizes == sorted(sizes, reverse=True)
    context = 0
    for n in sizes[:-1]:
        assert n * (context + n) <= 400 or n == 2          # within the budget, or the guaranteed minimum
        context += n
    s, _ = make(tokens=64, pairs=100, min_chunk=2)
    b = req("b", 80)
    s.add(b)
    sizes = run_chunks(s, b)
    assert sizes[0] == 10 and sum(sizes) == 80 and sizes[-3:-1] == [2, 2]  # later only the guaranteed minimum


def test_chunk_within_is_the_largest_fitting_chunk():
    for context in (0, 1, 7, 100, 5000):
        for pairs in (0, 1, 50, 4096, 10**6):
            n = chunk_within(pairs, context)
            assert n * (context + n) <= pairs < (n + 1) * (context + n + 1)


def test_a_partly_prefilled_request_is_preempted_and_starts_over():
    s, kv = make(tokens=8, num_blocks=5, block_size=4)
    a, b = req("a", 6), req("b", 24)
    s.add(a)
    s.schedule()
    s.commit(a, [1])                                       # a: 7 tokens, 2 blocks
    s.add(b)
    out = s.schedule()                                     # a decodes, b gets a 7-token chunk (2 blocks)
    s.commit(a, [2])
    s.advance(out.scheduled[1])
    assert b.num_computed_tokens == 7
    out = s.schedule()                                     # a needs a 3rd block, b's next chunk 2 more: b goes
    assert out.preempted == ["b"] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.max_computed_tokens == 7 and kv.block_table("b") == []


def test_every_decode_keeps_a_token_when_draft_slots_would_use_up_the_budget():
    s, _ = make(tokens=6, lookahead=4)
    reqs = [req(rid, 2) for rid in "abc"]
    for r in reqs:
        s.add(r)
    s.schedule()
    for r in reqs:
        s.commit(r, [7])
    out = s.schedule()
    assert [(x.num_new_tokens, x.num_lookahead) for x in out.scheduled] == [(1, 3), (1, 0), (1, 0)]
