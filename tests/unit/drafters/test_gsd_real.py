"""GSD on the real SmolLM2 target: greedy output unchanged with merging on and off, merges counted.

The draft model is the shipped SmolLM2 draft model when present, else the target's own folder (a draft model
that shares the tokenizer by construction), so the test always runs."""

from __future__ import annotations

import pytest
from unit.drafters.test_draft_model_real import run

from drafters.registry import shipped_drafter
from drafters.train.distill import chat_prompt_ids

PROMPTS = ["Explain how a bicycle gear system works.", "List three uses of copper, one per line.",
           "What is the capital of France? Answer in one sentence."]


@pytest.mark.slow
def test_gsd_is_lossless_on_the_real_model_with_and_without_merging(default_model_dir):
    from server.build import build_engine
    from server.config import ServerConfig

    shipped = shipped_drafter("default", "draft-model")
    draft = shipped if shipped.is_dir() else default_model_dir
    common = {"model": str(default_model_dir), "num_kv_blocks": 256, "calibrate_tree": False}
    plain, _ = build_engine(ServerConfig(drafter="none", **common))
    tok = plain.tokenizer
    prompts = [chat_prompt_ids(tok, p) for p in PROMPTS]
    want, _ = run(plain, prompts, 24)
    reports = {}
    for repeat in (0, -1):
        spec, _ = build_engine(ServerConfig(drafter="gsd", drafter_path=str(draft), max_draft_tokens=12,
                                            gsd={"repeat_threshold": repeat}, **common))
        got, reqs = run(spec, prompts, 24)
        assert got == want, f"repeat_threshold {repeat}"
        assert all(r.spec.drafted_tokens > 0 for r in reqs)
        assert spec.scheduler.kv.pool.usage == 0.0 and not spec.runner.drafter.states
        reports[repeat] = spec.runner.drafter.bench_report()
    merged, plain_graph = reports[0]["totals"], reports[-1]["totals"]
    assert plain_graph["merges"] == 0 and plain_graph["nodes_fed"] == plain_graph["unmerged_nodes_fed"]
    assert merged["merges"] > 0 and merged["nodes_fed"] <= merged["unmerged_nodes_fed"]
