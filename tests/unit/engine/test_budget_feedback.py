"""Budgets checked on served steps: synthetic step sequences (no torch, no models)."""

from __future__ import annotations

import logging
import random

import pytest

from bench.budget_feedback_sim import MEAN_ACCEPTED, delivered, request_stream, serve, serve_requests
from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.engine.budget import BudgetPolicy, probe_budgets
from server.engine.budget_feedback import ServedBudgets
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler, SchedulerConfig

B = 8   # decoding requests in every simulated step


TAU = {0: 1.0, 4: 2.25}   # 18 tokens per tree step at batch 8


def at_batch(budget: int, probe: int | None) -> ServedBudgets:
    """A prior of ``budget`` at every batch size up to ``B`` with ``probe`` as the alternative."""
    return ServedBudgets(BudgetPolicy.fixed(budget, B), (probe,) * B)


def test_plain_takes_over_when_served_trees_are_slower():
    policy = at_batch(4, 0)
    cost = {0: 0.037, 4: 0.088}        # plain 6% faster, as in mt_bench_c8_stage7 though calibrated slower
    served = serve(policy, 600, cost, TAU)
    assert policy.budget(B) == 0 and policy.budget(B - 1) == 4           # batch sizes learn separately
    assert policy.table()[B] == 0 and "checked on served steps" in policy.describe()
    first_plain_lead = next(i for i in range(4, len(served)) if served[i - 4:i + 1] == [0] * 5)
    assert first_plain_lead < 40                                         # 4 probes, 4 steps apart
    assert served[-300:].count(4) <= 2 * (300 // 64 + 1)                 # settled: one 2-step probe per 64 steps


def test_a_tree_that_pays_keeps_leading_and_probes_grow_rare():
    policy = at_batch(4, 0)
    served = serve(policy, 1000, {0: 0.030, 4: 0.040}, TAU)
    assert policy.budget(B) == 4
    assert served.count(0) <= 8 + 1000 // 64 and served[-200:].count(0) <= 4


def test_a_tree_takes_over_where_calibration_chose_plain():
    policy = at_batch(0, 4)
    served = serve(policy, 200, {0: 0.050, 4: 0.060}, TAU)
    assert policy.budget(B) == 4 and served[-50:].count(4) >= 45


def test_a_tree_probe_is_measured_after_the_drafter_caught_up():
    """Plain decoding leads; the tree is 1.2x faster step after step, but its first step after a run of
    plain steps pays 2 ms per missed step: the unmeasured first probe step absorbs that, and the tree wins."""
    policy = at_batch(0, 4)
    cost = {0: 0.030, 4: 0.030 * 2.25 / 1.2}
    served = serve(policy, 400, cost, TAU, catch_up=0.002)
    assert policy.budget(B) == 4 and served[-100:].count(0) <= 3
    assert served[4:6] == [4, 4]                                        # the first probe: two tree steps


@pytest.mark.parametrize("seed", range(3))
def test_noisy_steps_neither_swap_to_a_slower_tree_nor_miss_a_faster_one(seed):
    """Tree steps commit 8-40 tokens at random: a tree 8% slower than plain decoding on average never takes
    the lead over 3,000 steps, and one 30% faster does within 300."""
    for speed, lead in ((0.92, 0), (1.3, 4)):
        policy = at_batch(0, 4)
        cost = {0: 0.030, 4: 0.030 * MEAN_ACCEPTED / speed}
        served = serve(policy, 3000 if lead == 0 else 300, cost, TAU, rng=random.Random(seed))
        assert policy.budget(B) == lead, speed
        if lead == 0:
            assert served.count(4) < 0.05 * len(served)


def test_simulated_probing_costs_little():
    """The sweep behind bench/results/issue8/budget_feedback_sim.json, smaller: from either prior, a slower
    tree costs under 3% of plain decoding's rate over 1,000 steps, and a clearly faster one is mostly served."""
    for prior in (0, 4):
        slow, fast = delivered(0.85, prior, 1000, 5), delivered(1.3, prior, 1000, 5)
        assert slow["vs_plain"] > 0.97 and fast["tree_share"] > 0.9 and fast["vs_best"] > 0.98


def test_near_ties_settle_on_plain_decoding():
    tree_leads, plain_leads = at_batch(4, 0), at_batch(0, 4)
    cost = {0: 0.030, 4: 0.030 * 2.25 * 1.005}                          # plain 0.5% faster
    serve(tree_leads, 300, cost, TAU)
    assert tree_leads.budget(B) == 0
    cost = {0: 0.030, 4: 0.030 * 2.25 / 1.01}                           # the tree 1% faster: within the margin
    served = serve(plain_leads, 2000, cost, TAU)
    assert plain_leads.budget(B) == 0 and served[-500:].count(4) <= 500 // 4 + 1


def test_paired_ratios_follow_the_host_not_the_clock():
    """The host slows down 3x over the run; the tree stays 1.3x faster at every moment, so it keeps
    leading (a rate of plain decoding remembered from the fast start would beat the slow tree)."""
    policy = at_batch(4, 0)
    cost = {0: 0.030, 4: 0.030 * 2.25 / 1.3}
    serve(policy, 1500, cost, TAU, host=lambda step: 1 + 2 * step / 1500)
    assert policy.budget(B) == 4


def test_only_clean_steps_count_and_a_due_probe_waits_for_one():
    policy = at_batch(4, 0)
    served = serve(policy, 40, {0: 0.037, 4: 0.088}, TAU, clean=lambda step: step < 4 or step >= 30)
    assert served[:4] == [4] * 4 and served[4:31] == [0] * 27    # the first probe waits for a clean step
    assert served[31:35] == [4] * 4 and served[35] == 0
    assert len(policy.arms[B - 1].ratios) == 2


def test_always_zero_and_never_zero_without_probes():
    off, on = at_batch(0, None), at_batch(8, None)
    assert serve(off, 100, {0: 0.03, 8: 0.01}, {0: 1.0, 8: 3.0}) == [0] * 100
    assert serve(on, 100, {0: 0.01, 8: 0.09}, {0: 1.0, 8: 1.0}) == [8] * 100
    assert off.table() == {b: 0 for b in range(1, B + 1)} and on.table() == {b: 8 for b in range(1, B + 1)}


def test_swaps_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="server.engine.budget_feedback"):
        serve(at_batch(4, 0), 60, {0: 0.037, 4: 0.088}, TAU)
    assert any("batch 8: budget 0 committed" in r.message and "serving 0" in r.message for r in caplog.records)


def steps(policy: ServedBudgets, n: int, request: str, tree_tokens: int, batch: int = 1) -> list[int]:
    """``n`` clean steps of ``request`` alone: plain 30 ms per token, the tree 42 ms for ``tree_tokens``."""
    served = []
    for _ in range(n):
        b = policy.serve(batch)
        served.append(b)
        policy.observe(batch, b, tree_tokens if b else 1, 0.042 if b else 0.030, frozenset({request}))
    return served


def test_a_new_request_restarts_from_calibrations_choice():
    """At batch 1 a hard request (the tree 0.79x plain) hands the lead to plain decoding; the next request
    starts at the calibrated tree again, with no ratios, and probes soon."""
    policy = ServedBudgets(BudgetPolicy.fixed(4, 2), (0, 0))
    steps(policy, 40, "hard", 1)
    assert policy.budget(1) == 0
    served = steps(policy, 1, "easy", 3) + steps(policy, 200, "easy", 3)
    assert served[0] == 0 and served[1:5] == [4] * 4                # the first step ran under the old leader
    assert policy.budget(1) == 4 and served[-100:].count(0) <= 100 // 64 + 1


def test_evidence_carries_while_requests_continue_or_the_leader_is_calibrated():
    plain = ServedBudgets(BudgetPolicy.fixed(4), (0,))
    steps(plain, 40, "hard", 1)
    arms = plain.arms[0]
    interval, ratios = arms.interval, list(arms.ratios)
    steps(plain, 1, "hard", 1)
    assert plain.budget(1) == 0 and arms.interval == interval and list(arms.ratios)[:len(ratios)] == ratios
    plain.observe(1, 0, 1, 0.03)                                     # requests unknown: no restart either
    assert plain.budget(1) == 0
    tree = ServedBudgets(BudgetPolicy.fixed(4), (0,))
    steps(tree, 200, "easy", 3)
    arms = tree.arms[0]
    interval, ratios = arms.interval, list(arms.ratios)
    steps(tree, 1, "other", 3)                                       # a new request, calibrated leader
    assert arms.interval == interval > tree.min_interval and list(arms.ratios) == ratios


def test_a_batch_restarts_only_when_every_request_is_new():
    policy = at_batch(4, 0)
    for _ in range(40):
        b = policy.serve(2)
        policy.observe(2, b, 2, 0.042 if b else 0.030, frozenset({"a", "b"}))
    assert policy.budget(2) == 0
    policy.observe(2, 0, 2, 0.030, frozenset({"b", "c"}))           # one request carried over
    assert policy.budget(2) == 0
    policy.observe(2, 0, 2, 0.030, frozenset({"d", "e"}))           # a whole new batch
    assert policy.budget(2) == 4 and not policy.arms[1].ratios


def test_restarts_are_logged(caplog):
    policy = ServedBudgets(BudgetPolicy.fixed(4), (0,))
    steps(policy, 40, "hard", 1)
    with caplog.at_level(logging.INFO, logger="server.engine.budget_feedback"):
        steps(policy, 1, "easy", 3)
    assert any("batch 1: new requests; back to the calibrated budget 4" in r.message for r in caplog.records)


def test_simulated_request_stream_gains_from_restarts():
    """bench/results/issue8/budget_feedback_sim.json's request streams, smaller: with half the requests hard,
    telling the policy each step's request beats carrying evidence across requests."""
    row = request_stream(3, 20, 0.5, 1.4)
    assert row["told_requests"] > row["not_told"]
    assert row["told_requests"] >= 0.98 * row["always_tree"]


def test_served_requests_commit_every_token():
    policy = ServedBudgets(BudgetPolicy.fixed(4), (0,))
    tokens, seconds = serve_requests(policy, [False, True, False], {0: 0.03, 4: 0.042}, random.Random(0))
    assert tokens >= 3 * 128 and seconds > 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        ServedBudgets(BudgetPolicy.fixed(4, 2), (0,))
    with pytest.raises(ValueError):
        ServedBudgets(BudgetPolicy.fixed(4, 2), (0, 0), min_pairs=9, window=7)


def test_probe_budgets_from_cost_tables():
    profile = {4: 2.0, 8: 2.4}
    verify = {1: {0: 0.030, 4: 0.035, 8: 0.040}, 8: {0: 0.040, 4: 0.090, 8: 0.200}}
    prior = BudgetPolicy((8, 8, 8, 8, 0, 0, 0, 0))
    probes = probe_budgets(verify, prior, profile)
    assert probes[:4] == (0, 0, 0, 0)                          # a chosen tree is checked against plain decoding
    assert probes[7] == 4                                       # 8 * 2 / 90 ms = 0.89x plain: above the 0.85 floor
    assert probe_budgets(verify, prior, profile, floor=0.95)[7] is None   # too slow to be worth a probe


def test_scheduler_serves_probes_and_reports_only_clean_steps():
    policy = at_batch(4, 0)
    s = Scheduler(SchedulerConfig(B, 1024, 4, budget_policy=policy), KVManager(BlockPool(256, 4)))
    reqs = [Request(str(i), list(range(6)), SamplingParams(max_tokens=200, temperature=0)) for i in range(B)]
    for r in reqs:
        s.add(r)
    out = s.schedule()                                          # prefills: not a decoding step
    s.observe(out, B, 1.0)
    assert out.budget is None and policy.arms[B - 1].leader_steps == 0
    budgets = []
    for _ in range(5):
        for r in reqs:
            s.commit(r, [42])
        out = s.schedule()
        budgets.append(out.budget)
        s.observe(out, B * (2 if out.budget else 1), 0.01)
    assert budgets == [4, 4, 4, 4, 0]                           # the fifth step probes plain decoding
    assert [x.num_lookahead for x in out.scheduled] == [0] * B
    assert policy.report()[B]["probe_over_leader"] == [0.5]
    assert policy.arms[B - 1].requests == frozenset(r.request_id for r in reqs)


@pytest.mark.parametrize("own", [{"draft_tokens": 2}, {"draft_depth": 2}, {"temperature": 0.8, "seed": 7}])
def test_steps_with_a_request_off_the_step_budget_are_not_reported(own):
    policy = at_batch(4, 0)
    s = Scheduler(SchedulerConfig(B, 1024, 4, budget_policy=policy), KVManager(BlockPool(256, 4)))
    reqs = [Request(str(i), list(range(6)), SamplingParams(max_tokens=200, temperature=0)) for i in range(B - 1)]
    reqs.append(Request("own", list(range(6)), SamplingParams(max_tokens=200, **{"temperature": 0, **own})))
    for r in reqs:
        s.add(r)
    s.schedule()
    for _ in range(5):
        for r in reqs:
            s.commit(r, [42])
        out = s.schedule()
        assert out.budget == 4                                  # still served the leader
        s.observe(out, B, 0.01)
    assert policy.arms[B - 1].leader_steps == 0                # but never measured


def test_report_lists_each_probed_batch_size():
    policy = ServedBudgets(BudgetPolicy((8, 4, 0)), (0, 0, None))
    serve(policy, 20, {0: 0.030, 4: 0.040}, TAU, batch=2)
    report = policy.report()
    assert set(report) == {1, 2} and report[2]["leader"] == 4 and report[2]["probe"] == 0
    assert report[1]["probe_over_leader"] == [] and len(report[2]["probe_over_leader"]) == 4
