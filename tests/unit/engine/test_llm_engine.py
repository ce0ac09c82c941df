"""End-to-end engine behaviour: greedy equals plain greedy decoding, under batching and preemption."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_matches_reference,
    random_prompts,
    reference_greedy,
    run_to_completion,
    tiny_engine,
)

from server.engine.llm_engine import RequestTooLong
from server.engine.request import SamplingParams


def prompts(n: int) -> list[list[int]]:
    return random_prompts(n, seed=5, min_len=3, max_len=30)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_greedy_batch1_equals_reference(tiny_pair):
    hf, model = tiny_pair
    engine = tiny_engine(model)
    for i, p in enumerate(prompts(3)):
        got = run_to_completion(engine, {f"r{i}": (p, greedy(20))})[f"r{i}"]
        assert got == reference_greedy(hf, p, 20)
    assert engine.scheduler.kv.pool.usage == 0.0


def test_greedy_continuous_batching_equals_reference(tiny_pair):
    hf, model = tiny_pair
    engine = tiny_engine(model, num_blocks=128)
    ps = prompts(8)
    reqs = {f"r{i}": (p, greedy(10 + i)) for i, p in enumerate(ps)}
    # stagger arrivals: half now, half after a few steps, so prefills mix with decodes
    first = dict(list(reqs.items())[:4])
    for rid, (ids, params) in first.items():
        engine.add_request(rid, ids, params)
    got = {rid: [] for rid in reqs}
    for _ in range(3):
        for o in engine.step()[0]:
            got[o.request_id].extend(o.token_ids)
    for rid, tokens in run_to_completion(engine, dict(list(reqs.items())[4:])).items():
        got[rid].extend(tokens)
    for rid, (ids, params) in reqs.items():
        assert got[rid] == reference_greedy(hf, ids, params.max_tokens), rid
    assert engine.scheduler.kv.pool.usage == 0.0


def test_preemption_recompute_keeps_output_identical(tiny_pair):
    hf, model = tiny_pair
    engine = tiny_engine(model, num_blocks=12, block_size=4)  # 48 slots for 4 requests growing to ~38
    reqs = assert_matches_reference(engine, hf, [p[:8] for p in prompts(4)], 30)
    assert sum(r.num_preemptions for r in reqs) > 0


def test_abort_mid_generation_frees_blocks(tiny_pair):
    _, model = tiny_pair
    engine = tiny_engine(model)
    engine.add_request("a", prompts(1)[0], greedy(50))
    engine.step()
    engine.step()
    out = engine.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert engine.scheduler.kv.pool.usage == 0.0 and not engine.has_unfinished()


def test_length_validation(tiny_pair):
    _, model = tiny_pair
    engine = tiny_engine(model, max_model_len=64)
    with pytest.raises(RequestTooLong, match="60 in the prompt, 10 for the completion"):
        engine.add_request("a", list(range(3, 63)), greedy(10))
    with pytest.raises(ValueError):
        engine.add_request("b", [], greedy(10))


def test_seeded_sampling_is_reproducible_across_batch_composition(tiny_pair):
    _, model = tiny_pair
    p = prompts(1)[0]
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=11)
    alone = run_to_completion(tiny_engine(model), {"a": (p, params)})["a"]
    mixed = run_to_completion(tiny_engine(model), {"x": (prompts(2)[1], SamplingParams(max_tokens=9, seed=1)),
                                                   "a": (p, params)})["a"]
    assert alone == mixed


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Explain recursion in one sentence.", "Translate 'good morning' to Spanish.",
             "What is 12 times 13?", "Name a famous painter.", "Give me a synonym for happy."]


@pytest.fixture(scope="module")
def smollm2_reference(default_model_dir):
    """Chat prompts for ``QUESTIONS`` and transformers' greedy continuations (24 tokens)."""
    from transformers import AutoModelForCausalLM

    from server.models.loader import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(default_model_dir)
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)
           for q in QUESTIONS]
    with torch.inference_mode():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
                for p in ids]
    return ids, want


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["auto", "eagle", "gumiho", "hybrid", "swift"])
def test_smollm2_greedy_equals_transformers_batch1_and_batched(default_model_dir, smollm2_reference, drafter):
    """The default configuration (``auto``: whatever calibration picks here) and the shipped drafters
    forced on (no calibration) all reproduce transformers' greedy output, alone and 8 at once."""
    from server.build import build_engine
    from server.config import ServerConfig
    from server.engine.budget_feedback import ServedBudgets

    forced = {} if drafter == "auto" else {"drafter": drafter, "calibrate_tree": False, "max_draft_tokens": 8}
    engine, _ = build_engine(ServerConfig(model=str(default_model_dir), num_kv_blocks=256, **forced))
    ids, want = smollm2_reference
    alone = run_to_completion(engine, {"solo": (ids[0], greedy(24))})["solo"]
    assert alone == want[0]
    batched = run_to_completion(engine, {f"q{i}": (p, greedy(24)) for i, p in enumerate(ids)})
    for i in range(len(ids)):
        assert batched[f"q{i}"] == want[i], QUESTIONS[i]
    assert engine.scheduler.kv.pool.usage == 0.0
    if forced:
        assert engine.runner.drafter.name == drafter
    else:                                          # calibrated, then checked on served steps
        assert isinstance(engine.scheduler.policy, ServedBudgets)
