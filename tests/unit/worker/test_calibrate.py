"""Verify-cost measurement and the tree budget it implies."""

from __future__ import annotations

from helpers import tiny_engine

from server.worker.calibrate import choose_budget, measure_verify_cost


def test_measure_verify_cost_frees_its_blocks():
    engine = tiny_engine(num_blocks=128)
    costs = measure_verify_cost(engine.runner, [0, 4, 16], context=32, repeats=1)
    assert set(costs) == {0, 4, 16} and all(c > 0 for c in costs.values())
    assert engine.scheduler.kv.pool.usage == 0.0


def test_choose_budget_trades_acceptance_for_cost():
    costs = {4: 1.0, 8: 1.1, 16: 1.2, 32: 2.4}
    best, rate = choose_budget(costs, tau={4: 2.0, 16: 3.0, 32: 3.3})
    assert best == 16 and rate[16] == 3.0 / 1.2
    assert choose_budget({4: 1.0, 8: 1.0})[0] == 8        # heuristic: equal cost -> bigger tree
    assert choose_budget({4: 1.0, 8: 2.0})[0] == 4


def test_drafting_cost_counts_and_plain_decoding_competes():
    verify = {0: 1.0, 4: 1.5, 16: 2.0}
    tau = {4: 2.0, 16: 3.0}
    assert choose_budget(verify, tau)[0] == 16                               # 3.0 / 2.0 beats 2.0 / 1.5
    best, rate = choose_budget(verify, tau, draft={4: 0.1, 16: 1.0})
    assert best == 4 and rate[4] == 2.0 / 1.6 and rate[0] == 1.0
    assert choose_budget(verify, {4: 1.2, 16: 1.5}, draft={4: 0.5, 16: 0.5})[0] == 0  # no tree pays: off
    assert choose_budget(verify, None, draft={4: 5.0, 16: 5.0})[0] in (4, 16)       # unmeasured tau: never off


def test_measure_draft_cost_leaves_no_state(tiny_pair):
    from helpers import tiny_hf_config

    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import EagleConfig, EagleDrafter
    from server.worker.calibrate import measure_draft_cost

    _, target = tiny_pair
    net = EagleDrafter(EagleConfig.from_target(tiny_hf_config()), target.embed_tokens.weight,
                       target.lm_head.weight).eval()
    drafter = EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3)
    costs = measure_draft_cost(drafter, 64, 211, [4, 8], context=24, repeats=1)
    assert set(costs) == {4, 8} and all(c > 0 for c in costs.values()) and not drafter.states


def test_engine_switches_speculation_off_when_no_tree_pays(monkeypatch, default_model_dir):
    from drafters import registry
    from server import build
    from server.config import ServerConfig

    monkeypatch.setattr(registry, "load_acceptance_profile", lambda folder: {4: 1.1, 8: 1.2})
    monkeypatch.setattr(build, "measure_verify_cost", lambda runner, sizes: {n: 1.0 + n for n in sizes})
    monkeypatch.setattr(build, "measure_draft_cost", lambda *a, **k: {n: 1.0 for n in a[3]})
    engine, _ = build.build_engine(ServerConfig(model=str(default_model_dir), drafter="eagle", num_kv_blocks=64,
                                                max_draft_tokens=8))
    assert engine.runner.drafter is None and engine.scheduler.config.num_lookahead_slots == 0
