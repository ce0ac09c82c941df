"""Speculative greedy output == plain greedy output on MT-bench first turns (real SmolLM2, 128 tokens).

The plain reference runs all 80 questions with 16 in flight (itself checked against batch-1
plain decoding in tests/unit/engine). Every drafter then runs all 80 questions with 8
concurrent requests, and a batch-1 pass over one question per category (time budget).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_to_completion

from bench.questions import load_questions
from drafters.registry import shipped_drafter
from drafters.train.distill import chat_prompt_ids
from server.build import build_engine
from server.config import ServerConfig
from server.engine.request import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(3600)]
MT_BENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mt_bench.jsonl"
MAX_NEW = 128


def run(engine, prompts: dict[str, list[int]], concurrency: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    items = list(prompts.items())
    for i in range(0, len(items), concurrency):
        chunk = dict(items[i:i + concurrency])
        out.update(run_to_completion(engine, {k: (v, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
                                              for k, v in chunk.items()}))
    assert engine.scheduler.kv.pool.usage == 0.0
    return out


@pytest.fixture(scope="module")
def questions():
    if not MT_BENCH.exists():
        pytest.skip("shared/data/mt_bench.jsonl not present")
    return load_questions(MT_BENCH)


@pytest.fixture(scope="module")
def reference(default_model_dir, questions):
    engine, _ = build_engine(ServerConfig(model=str(default_model_dir), drafter="none", num_kv_blocks=2048))
    prompts = {str(q.question_id): chat_prompt_ids(engine.tokenizer, q.turns[0]) for q in questions}
    return prompts, run(engine, prompts, concurrency=16)


@pytest.mark.parametrize("drafter", ["lookup", "eagle", "gumiho", "hybrid", "swift", "medusa", "draft-model", "gsd"])
def test_speculative_greedy_equals_plain_on_mt_bench(default_model_dir, questions, reference, drafter):
    checkpoint = {"lookup": None, "swift": None, "hybrid": "eagle",   # hybrid: eagle's; gsd: the draft model's
                  "gsd": "draft-model"}.get(drafter, drafter)
    if checkpoint and not shipped_drafter("default", checkpoint).is_dir():
        pytest.fail(f"the shipped {checkpoint} drafter for the default model is missing")
    prompts, want = reference
    engine, _ = build_engine(ServerConfig(model=str(default_model_dir), drafter=drafter, num_kv_blocks=2048,
                                          max_draft_tokens=8, calibrate_tree=False))
    got = run(engine, prompts, concurrency=8)
    mismatched = [qid for qid in prompts if got[qid] != want[qid]]
    assert not mismatched, f"{drafter}: {len(mismatched)} questions differ from plain greedy: {mismatched}"
    per_category: dict[str, int] = {}
    subset = {}
    for q in questions:
        per_category[q.category] = per_category.get(q.category, 0) + 1
        if per_category[q.category] <= 1:
            subset[str(q.question_id)] = prompts[str(q.question_id)]
    solo = run(engine, subset, concurrency=1)
    assert all(solo[qid] == want[qid] for qid in subset)
