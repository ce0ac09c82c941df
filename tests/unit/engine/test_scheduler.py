"""Admission, lookahead reservation, preemption by recompute, finishing."""

from __future__ import annotations

from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.engine.budget import BudgetPolicy
from server.engine.request import Request, SamplingParams, Status
from server.engine.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=8, block_size=4, lookahead=0, max_num_seqs=4, policy=None):
    kv = KVManager(BlockPool(num_blocks, block_size))
    return Scheduler(SchedulerConfig(max_num_seqs, 1024, lookahead, budget_policy=policy), kv), kv


def req(rid, n=6, max_tokens=20, draft_tokens=None):
    return Request(rid, list(range(n)), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                       draft_tokens=draft_tokens))


def test_prefill_then_decode_with_lookahead():
    s, kv = make(lookahead=5)
    a = req("a")
    s.add(a)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens, x.is_prefill) for x in out.scheduled] == [("a", 6, True)]
    s.commit(a, [42])
    assert a.num_computed_tokens == 6 and a.token_ids[-1] == 42
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.num_new_tokens, x.num_lookahead, x.is_prefill) == (1, 5, False) and out.budget == 5
    assert len(kv.block_table("a")) * kv.block_size >= 7 + 5


def decode_step(s, reqs):
    """Prefill or commit one token for every request, then schedule the next step."""
    for r in reqs:
        s.commit(r, [42])
    return s.schedule()


def test_budget_follows_the_number_of_decoding_requests():
    s, kv = make(num_blocks=64, lookahead=8, policy=BudgetPolicy((8, 8, 2, 0)))
    a, b, c, d = (req(rid) for rid in "abcd")
    s.add(a)
    assert s.schedule().budget is None                     # prefill only: no decoding request
    out = decode_step(s, [a])
    assert out.budget == 8 and [x.num_lookahead for x in out.scheduled] == [8]
    assert len(kv.block_table("a")) == 4                   # 7 tokens + 8 lookahead slots: 4 blocks of 4
    for r in (b, c):
        s.add(r)
    out = s.schedule()                                     # a decodes alone while b, c prefill
    assert out.budget == 8 and [x.is_prefill for x in out.scheduled] == [False, True, True]
    out = decode_step(s, [a, b, c])
    assert out.budget == 2 and [x.num_lookahead for x in out.scheduled] == [2, 2, 2]
    assert len(kv.block_table("a")) == 3                   # 8 tokens + 2 slots: the lookahead shrank with it
    s.add(d)
    s.schedule()
    out = decode_step(s, [a, b, c, d])
    assert out.budget == 0 and [x.num_lookahead for x in out.scheduled] == [0] * 4
    assert [len(kv.block_table(r.request_id)) for r in (a, b, c, d)] == [3, 2, 2, 2]
    s.finish(b, "stop")
    s.finish(c, "stop")
    s.finish(d, "stop")
    out = decode_step(s, [a])
    assert out.budget == 8 and out.scheduled[0].num_lookahead == 8


def test_request_budget_and_caps_apply_under_a_policy():
    s, _ = make(num_blocks=64, lookahead=8, policy=BudgetPolicy((8, 0)))
    own, off, short = req("own", draft_tokens=5), req("off", draft_tokens=0), req("short", max_tokens=4)
    for r in (own, off, short):
        s.add(r)
    s.schedule()
    out = decode_step(s, [own, off, short])               # budget 0 at 3 requests: only 'own' asks for a tree
    assert out.budget == 0 and [x.num_lookahead for x in out.scheduled] == [5, 0, 0]
    s.finish(own, "stop")
    s.finish(off, "stop")
    out = decode_step(s, [short])                          # budget 8, capped by max_tokens: 4 - 2 - 1 left
    assert out.budget == 8 and out.scheduled[0].num_lookahead == 1


def test_admission_stops_when_blocks_run_out():
    s, _ = make(num_blocks=3)
    for rid in "abc":
        s.add(req(rid, n=5))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a"]  # b needs 2 more blocks, only 1 free
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_max_num_seqs():
    s, _ = make(num_blocks=64, max_num_seqs=2)
    for rid in "abc":
        s.add(req(rid, n=2))
    assert len(s.schedule().scheduled) == 2


def test_preemption_by_recompute_and_resume():
    s, _ = make(num_blocks=4, block_size=4)
    a, b = req("a", n=7), req("b", n=7)
    s.add(a)
    s.add(b)
    s.schedule()                 # both prefills fit (2 blocks each)
    s.commit(a, [1])
    s.commit(b, [2])             # each now has 8 tokens: 8 slots fit in their 2 blocks
    s.schedule()
    s.commit(a, [3])
    s.commit(b, [4])             # 9 tokens each: each needs a 3rd block, none free
    out = s.schedule()
    assert out.preempted == ["b"] and [x.request.request_id for x in out.scheduled] == ["a"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert b.token_ids[-2:] == [2, 4]  # generated tokens survive; they are recomputed on resume
    s.finish(a, "stop")
    out = s.schedule()
    (x,) = out.scheduled
    assert x.request is b and x.is_prefill and x.num_new_tokens == 9


def test_finish_and_abort_free_everything():
    s, kv = make()
    a, b = req("a"), req("b")
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish(a, "stop")
    assert s.abort("b") is b and b.finish_reason == "abort"
    assert kv.pool.usage == 0.0 and not s.has_unfinished()
    assert s.abort("missing") is None


def test_commit_stops_at_eos_and_max_tokens():
    s, _ = make()
    r = Request("a", [1, 2], SamplingParams(max_tokens=3, temperature=0), eos_token_ids=(9,))
    s.add(r)
    s.schedule()
    assert s.commit(r, [5, 9, 7]) == [5, 9] and r.finish_reason == "stop"
    r2 = Request("b", [1, 2], SamplingParams(max_tokens=2, temperature=0))
    s.add(r2)
    s.schedule()
    assert s.commit(r2, [5, 6, 7]) == [5, 6] and r2.finish_reason == "length"
