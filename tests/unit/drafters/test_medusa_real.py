"""Medusa on the real model with the shipped heads: greedy output equals plain greedy, batched and solo, with
the dynamic and the static tree, and the heads' drafts are accepted."""

from __future__ import annotations

import pytest
from helpers import run_to_completion

from drafters.medusa_config import MedusaConfig
from drafters.registry import shipped_drafter
from drafters.train.distill import chat_prompt_ids
from server.engine.request import SamplingParams

PROMPTS = ["Explain how a bicycle gear system works.", "What are three benefits of regular exercise?"]
MAX_NEW = 32


def generate(engine, prompts: dict[str, list[int]]) -> tuple[dict[str, list[int]], list]:
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    reqs = [engine.add_request(rid, ids, greedy) for rid, ids in prompts.items()]
    got = run_to_completion(engine, {})
    assert engine.scheduler.kv.pool.usage == 0.0
    return got, reqs


@pytest.mark.slow
def test_shipped_medusa_heads_are_lossless_and_accepted(default_model_dir):
    from server.build import build_engine
    from server.config import ServerConfig

    assert shipped_drafter("default", "medusa").is_dir(), "the shipped medusa heads are missing"
    base = {"model": str(default_model_dir), "num_kv_blocks": 256, "max_draft_tokens": 12, "calibrate_tree": False}
    plain, _ = build_engine(ServerConfig(**base, drafter="none"))
    prompts = {f"p{i}": chat_prompt_ids(plain.tokenizer, text) for i, text in enumerate(PROMPTS)}
    want, _ = generate(plain, prompts)
    for tree in ("dynamic", "static"):
        engine, _ = build_engine(ServerConfig(**base, drafter="medusa", medusa=MedusaConfig(tree=tree)))
        got, reqs = generate(engine, prompts)
        assert got == want, tree
        if tree == "dynamic":
            solo, _ = generate(engine, {"p0": prompts["p0"]})
            assert solo["p0"] == want["p0"]
        steps = sum(r.spec.verify_steps for r in reqs)
        accepted = sum(r.spec.accepted_tokens for r in reqs)
        print(f"{tree}: tau {1 + accepted / steps:.2f} over {steps} verify steps")
        assert accepted / steps > 0.2, tree
