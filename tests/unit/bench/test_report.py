"""Spec-Bench metric definitions: mean per-question tokens/s, pooled tau, speedup, identity."""

from __future__ import annotations

import json

import pytest

from bench.report import accepted_length_histogram, method_results, plot
from bench.runner import Row


def row(qid, cat, n, t, steps=0, acc=0, lens=()):
    return Row(qid, cat, token_ids=list(range(n)), wall_time=t, verify_steps=steps, accepted_tokens=acc,
               accept_lengths=list(lens))


def test_definitions():
    base = [row(1, "a", 10, 1.0), row(2, "b", 10, 2.0)]                      # 10 and 5 tok/s
    spec = [row(1, "a", 10, 0.5, steps=4, acc=6, lens=[3, 3, 2, 2]), row(2, "b", 10, 2.0, steps=10, acc=0)]
    res = method_results(spec, wall=2.5, baseline=base)
    o = res["overall"]
    assert o["tokens_per_s"] == pytest.approx((20 + 5) / 2)                    # mean of per-question rates
    assert o["speedup"] == pytest.approx(12.5 / 7.5)
    assert o["tau"] == pytest.approx((6 + 14) / 14)                            # pooled over steps
    assert o["aggregate_tokens_per_s"] == pytest.approx(20 / 2.5)
    assert o["identical_to_baseline"] is True
    assert res["per_category"]["a"]["speedup"] == pytest.approx(2.0)
    assert method_results(base, 3.0, None)["overall"]["tau"] == 1.0            # plain decoding
    assert accepted_length_histogram(spec) == {2: 2, 3: 2}


def test_identity_detects_a_difference():
    base = [row(1, "a", 10, 1.0)]
    other = [Row(1, "a", token_ids=list(range(9)) + [99], wall_time=1.0)]
    assert method_results(other, 1.0, base)["overall"]["identical_to_baseline"] is False
    two = method_results(other + [row(2, "b", 10, 1.0)], 1.0, base + [row(2, "b", 10, 1.0)])["overall"]
    assert two["identical_rate"] == 0.5


def test_plot_writes_png(tmp_path):
    rows = [row(1, "a", 10, 1.0, steps=4, acc=6, lens=[3, 2]), row(2, "b", 8, 1.0, steps=8, acc=0, lens=[1])]
    report = {"config": {"drafter": "x", "concurrency": 1}, "results": method_results(rows, 2.0, rows),
              "baseline": method_results(rows, 2.0, None), "accepted_length_histogram": {1: 1, 2: 1, 3: 1}}
    out = tmp_path / "r.png"
    plot(json.loads(json.dumps(report)), out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_compare_table_and_plot(tmp_path):
    from bench.compare import plot_compare, shape_for, table

    base = [row(1, "a", 10, 1.0), row(2, "b", 10, 1.0)]
    fast = [row(1, "a", 10, 0.5, steps=4, acc=6), row(2, "b", 10, 1.0, steps=10, acc=0)]
    compare = {"baseline": method_results(base, 2.0, None), "variants": {
        f"{d}@{b}": {"drafter": d, "budget": b, **method_results(fast if d == "gumiho" else base, 2.0, base)}
        for b in (16, 64) for d in ("eagle", "gumiho")}}
    compare["variants"]["default"] = {"drafter": "default", "budget": None, **method_results(fast, 2.0, base)}
    lines = table(compare)
    assert lines[0].startswith("| variant | tau | tokens/s | speedup |") and "tau a" in lines[0]
    assert len(lines) == 2 + 1 + 5 and lines[2].startswith("| plain | 1.00 | 10.00 | 1.00")
    assert lines[-1].startswith("| default | 1.43 |")
    assert lines[4] == "| gumiho@16 | 1.43 | 15.00 | 1.50 | True | 2.50 | 1.00 |"
    assert shape_for(64) == {"max_draft_tokens": 64, "draft_top_k": 8, "draft_depth": None, "draft_pruning": 32,
                             "calibrate_tree": False}
    plot_compare(json.loads(json.dumps(compare)), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_variant_specs_set_options():
    from bench.compare import parse_variant

    assert parse_variant("eagle") == ("eagle", {})
    assert parse_variant("swift[swift.stop_threshold=0.5,swift.search.seed=3,draft_top_k=2]") == (
        "swift", {"swift": {"stop_threshold": 0.5, "search": {"seed": 3}}, "draft_top_k": 2})
    assert parse_variant("draft-model[swift.optimise=false]")[1] == {"swift": {"optimise": False}}
    for bad in ("eagle[", "eagle[top_k]", "eagle[=3]", "two words"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_save_acceptance_takes_the_drafters_own_variants_only(tmp_path):
    from bench.harness import save_acceptance
    from server.config import ServerConfig

    report = {"date": "d", "config": {"questions": "q", "num_questions": 1, "max_new_tokens": 8},
              "compare": {"variants": {
                  "default": {"drafter": "default", "budget": None, "overall": {"tau": 3.0}},
                  "eagle@8": {"drafter": "eagle", "variant": "eagle", "budget": 8, "overall": {"tau": 2.0}},
                  "eagle[draft_top_k=2]@8": {"drafter": "eagle", "variant": "eagle[draft_top_k=2]", "budget": 8,
                                             "overall": {"tau": 1.0}}}}}
    save_acceptance(ServerConfig(drafter_path=str(tmp_path)), "eagle", report, tmp_path / "r.json")
    assert json.loads((tmp_path / "acceptance.json").read_text())["tau_by_budget"] == {"8": 2.0}


def test_rounds_interleave_the_two_methods(monkeypatch):
    """--rounds: each method sees every question once; the order of the two alternates from part to part."""
    import argparse

    from bench import harness

    calls = []

    def fake_run_engine(engine, prompts, max_new_tokens, concurrency, desc, profile=None):
        calls.append((engine, [p[0] for p in prompts]))
        return [row(p[0], "a", 4, 1.0) for p in prompts], 1.5

    monkeypatch.setattr(harness, "run_engine", fake_run_engine)
    prompts = [(q, "a", [1, 2]) for q in range(7)]
    args = argparse.Namespace(rounds=3, max_new_tokens=4, concurrency=2)
    (rows, wall), (base, base_wall) = harness.run_rounds("spec", "eagle", "plain", prompts, args, None)
    assert [c[0] for c in calls] == ["spec", "plain", "plain", "spec", "spec", "plain"]
    assert [c[1] for c in calls[:2]] == [[0, 3, 6]] * 2 and calls[2][1] == [1, 4]
    assert sorted(r.question_id for r in rows) == sorted(r.question_id for r in base) == list(range(7))
    assert wall == base_wall == 4.5
    calls.clear()
    (rows, _), base = harness.run_rounds("spec", "eagle", None, prompts, args, None)
    assert base is None and [c[0] for c in calls] == ["spec"] * 3 and len(rows) == 7


def test_compare_rounds_rotate_every_method_over_interleaved_parts(monkeypatch):
    """--compare --rounds: every engine built once, every method sees every question once, the first method of a
    round rotating by one; with one round each variant's engine is dropped after its turn."""
    from types import SimpleNamespace

    import server.build
    from bench import compare
    from server.config import ServerConfig

    calls, built = [], []

    def fake_build(cfg):
        built.append(cfg.drafter)
        return SimpleNamespace(name=cfg.drafter, runner=SimpleNamespace(drafter=None)), "model"

    def fake_run_engine(engine, prompts, max_new_tokens, concurrency, desc, profile=None):
        if desc != "warm-up":
            calls.append((engine.name, [p[0] for p in prompts]))
        return [row(p[0], "a", 4, 1.0 if engine.name == "none" else 0.5) for p in prompts], 1.0

    monkeypatch.setattr(server.build, "build_engine", fake_build)
    monkeypatch.setattr(compare, "run_engine", fake_run_engine)
    plain = SimpleNamespace(name="none")
    prompts = [(q, "a", [1, 2]) for q in range(7)]
    out = compare.run_compare(plain, ServerConfig(drafter="none"), prompts, 4, 1, ["eagle", "lookup"], [8], 0,
                              rounds=3)
    assert [c[0] for c in calls] == ["none", "eagle", "lookup", "eagle", "lookup", "none", "lookup", "none", "eagle"]
    assert built == ["eagle", "lookup"]
    for name in ("none", "eagle", "lookup"):
        assert sorted(q for engine, qs in calls if engine == name for q in qs) == list(range(7))
    assert out["rounds"] == 3 and set(out["variants"]) == {"eagle@8", "lookup@8"}
    assert out["variants"]["eagle@8"]["overall"]["speedup"] == pytest.approx(2.0)
    calls.clear()
    built.clear()
    compare.run_compare(plain, ServerConfig(drafter="none"), prompts, 4, 1, ["eagle"], [8, 16], 0)
    assert [c[0] for c in calls] == ["none", "eagle", "eagle"] and built == ["eagle", "eagle"]
