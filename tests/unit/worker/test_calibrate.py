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
