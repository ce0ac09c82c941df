"""Verify- and drafting-cost measurement per (batch size, tree size), and the budgets they imply."""

from __future__ import annotations

from helpers import tiny_engine

from server.worker.calibrate import measure_draft_cost, measure_verify_cost, measure_verify_table


def test_measure_verify_cost_frees_its_blocks():
    engine = tiny_engine(num_blocks=128)
    costs = measure_verify_cost(engine.runner, [0, 4, 16], context=32, repeats=1)
    assert set(costs) == {0, 4, 16} and all(c > 0 for c in costs.values())
    costs = measure_verify_cost(engine.runner, [0, 4], context=32, repeats=1, batch=3)
    assert set(costs) == {0, 4} and all(c > 0 for c in costs.values())
    assert engine.scheduler.kv.pool.usage == 0.0


def test_verify_table_shortens_or_skips_what_the_pool_cannot_hold():
    engine = tiny_engine(num_blocks=128, block_size=4)                # 512 slots
    table, contexts = measure_verify_table(engine.runner, [1, 4, 8, 64], [0, 8], context=64, repeats=1)
    assert contexts == {1: 64, 4: 64, 8: 55}                           # 8 x 16 blocks = 64 slots - 9 new
    assert set(table) == {1, 4, 8} and all(set(row) == {0, 8} for row in table.values())
    assert engine.scheduler.kv.pool.usage == 0.0


def test_verify_table_times_round_robin_after_a_warm_up_round(monkeypatch):
    """Each batch size: one untimed round over every tree size (first-use costs such as building a new row
    count's primitives stay out of the table), then the timed rounds, each one forward per size."""
    import time

    engine = tiny_engine(num_blocks=128)
    runner, seen, forward = engine.runner, [], engine.runner.forward

    def first_use_is_slow(ids, positions, seqs):
        if len(ids) not in seen:
            time.sleep(0.2)
        seen.append(len(ids))
        return forward(ids, positions, seqs)

    monkeypatch.setattr(runner, "forward", first_use_is_slow)
    table, _ = measure_verify_table(runner, [1, 2], [0, 4], context=16, repeats=1)
    assert seen == [1, 5, 1, 5, 2, 10, 2, 10]                          # rows per forward: b * (1 + n)
    assert all(t < 0.2 for row in table.values() for t in row.values())
    assert engine.scheduler.kv.pool.usage == 0.0


def tiny_eagle(tiny_pair):
    """An untrained EAGLE tree drafter on the tiny target (8 nodes, depth 3, top-k 3)."""
    from helpers import tiny_hf_config

    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import EagleConfig, EagleDrafter

    _, target = tiny_pair
    net = EagleDrafter(EagleConfig.from_target(tiny_hf_config()), target.embed_tokens.weight,
                       target.lm_head.weight).eval()
    return EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3)


def test_measure_draft_cost_leaves_no_state(tiny_pair):
    drafter = tiny_eagle(tiny_pair)
    costs = measure_draft_cost(drafter, 64, 211, [1, 3], [0, 4, 8], context=24, repeats=1)
    assert set(costs) == {1, 3} and all(set(row) == {4, 8} for row in costs.values())
    assert all(c > 0 for row in costs.values() for c in row.values()) and not drafter.states


def test_draft_cost_commits_what_a_verify_step_would(tiny_pair):
    """Before each timed proposal a request commits round(tau(n)) tokens, copied from its own context
    (so prompt lookup has matches), with one feature row per fed token."""
    drafter = tiny_eagle(tiny_pair)
    seen, on_accept = {}, drafter.on_accept

    def record(updates):
        for u in updates:
            assert u.features.shape[0] == len(u.fed_tokens)
            seen.setdefault(u.request_id, []).append((u.start, list(u.fed_tokens), u.next_token))
        on_accept(updates)

    drafter.on_accept = record
    measure_draft_cost(drafter, 64, 211, [1], [4, 8], context=24, repeats=2, tau=lambda n: {4: 2.4, 8: 3.2}[n])
    (start, context, root), *steps = next(iter(seen.values()))
    assert start == 0 and len(context) == 24 and [len(fed) for _, fed, _ in steps] == [2, 2, 3, 3]
    committed = context + [root]
    for pos, fed, nxt in steps:
        assert pos == len(committed) - 1 and fed[0] == committed[-1]
        new = fed[1:] + [nxt]
        assert any(committed[i:i + len(new)] == new for i in range(len(committed) - len(new)))
        committed += new


def test_engine_keeps_its_drafter_when_no_tree_pays(monkeypatch, default_model_dir):
    from drafters import registry
    from server import build
    from server.config import ServerConfig

    monkeypatch.setattr(registry, "load_acceptance_profile", lambda folder: {4: 1.1, 8: 1.2})
    monkeypatch.setattr(build, "measure_verify_table", lambda runner, batches, sizes: (
        {b: {n: b * (1.0 + n) for n in sizes} for b in batches}, {b: 256 for b in batches}))
    monkeypatch.setattr(build, "measure_draft_cost", lambda drafter, h, v, batches, sizes, **_: {
        b: {n: 1.0 for n in sizes if n} for b in batches})
    engine, _ = build.build_engine(ServerConfig(model=str(default_model_dir), drafter="eagle",
                                                num_kv_blocks=64, max_draft_tokens=8, max_num_seqs=4))
    assert engine.runner.drafter is not None and engine.scheduler.config.num_lookahead_slots == 8
    assert engine.scheduler.policy.table() == {1: 0, 2: 0, 3: 0, 4: 0}
