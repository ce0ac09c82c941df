"""Chunked prefill through the engine: outputs equal plain greedy decoding, partial chunks emit
nothing, prompt tokens are counted once (recomputation after a preemption is counted apart)."""

from __future__ import annotations

import time

import pytest
from helpers import assert_drafter_lossless, random_prompts, reference_greedy, tiny_engine

from drafters.eagle import EagleTreeDrafter
from drafters.hybrid import HybridConfig, HybridDrafter
from drafters.lookup import LookupDrafter
from kernels.reference import SHORT_QUERY
from server.engine.request import SamplingParams


def run(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got, stats = {f"r{i}": [] for i in range(len(prompts))}, []
    while engine.has_unfinished():
        t0 = time.monotonic()
        outputs, step = engine.step()
        assert 0 <= step.step_time <= time.monotonic() - t0
        stats.append(step)
        for o in outputs:
            assert o.token_ids or o.finished, "a step without tokens produced an output"
            got[o.request_id].extend(o.token_ids)
    return got, stats


@pytest.mark.parametrize("budget,pairs", [(7, 0), (16, 600), (64, 2000)])
def test_chunked_prefill_is_lossless_and_counts_prompt_tokens_once(tiny_pair, budget, pairs):
    hf, target = tiny_pair
    prompts = random_prompts(5, seed=budget, min_len=SHORT_QUERY - 10, max_len=3 * SHORT_QUERY)
    engine = tiny_engine(target, num_blocks=256, max_num_batched_tokens=budget, max_prefill_attention=pairs)
    got, stats = run(engine, prompts, max_tokens=12)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference_greedy(hf, p, 12), f"prompt {i}"
    assert sum(s.num_prompt_tokens for s in stats) == sum(map(len, prompts))
    assert max(s.num_prompt_tokens + s.num_generation_tokens for s in stats) <= budget + 5   # + one emitted each
    assert engine.scheduler.kv.pool.usage == 0.0


def test_recomputation_after_preemption_is_not_counted_as_prompt(tiny_pair):
    hf, target = tiny_pair
    prompts = random_prompts(4, seed=9, min_len=20, max_len=40)
    engine = tiny_engine(target, num_blocks=24, block_size=4, max_num_batched_tokens=16)
    got, stats = run(engine, prompts, max_tokens=16)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference_greedy(hf, p, 16)
    assert sum(s.num_preemptions for s in stats) > 0 and sum(s.num_recomputed_tokens for s in stats) > 0
    assert sum(s.num_prompt_tokens for s in stats) == sum(map(len, prompts))


@pytest.mark.parametrize("kind", ["lookup", "eagle", "hybrid"])
def test_drafters_stay_lossless_with_chunked_prompts(tiny_eagle, kind):
    hf, target, net = tiny_eagle
    eagle = EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3)
    eagle.max_pending = 5                                 # absorb context as the chunks arrive
    drafter = {"lookup": LookupDrafter(max_tree_tokens=8), "eagle": eagle,
               "hybrid": HybridDrafter(eagle, HybridConfig())}[kind]
    assert_drafter_lossless(hf, target, drafter, batch=4, seed=5, max_num_batched_tokens=6)


def test_a_seeded_sample_is_the_same_alone_and_under_load(tiny_pair):
    """Seeded sampled requests do not draft (unless they ask to): the load-dependent tree would change
    which random draws they use. Under a budget that changes with the batch size, the output alone equals
    the output beside greedy requests."""
    from server.engine.budget import BudgetPolicy

    _, target = tiny_pair
    seeded = SamplingParams(max_tokens=20, temperature=0.9, seed=42)
    prompt = random_prompts(1, seed=3, min_len=8, max_len=9)[0]
    outputs = []
    for others in (0, 5):
        engine = tiny_engine(target, num_blocks=256, drafter=LookupDrafter(max_tree_tokens=8),
                             budget_policy=BudgetPolicy((8, 6, 4, 2, 0, 0, 0, 0)))
        engine.add_request("seeded", prompt, seeded)
        for i in range(others):
            engine.add_request(f"g{i}", prompt[i:] + prompt[:i], SamplingParams(max_tokens=20, temperature=0.0))
        got = []
        while engine.has_unfinished():
            for o in engine.step()[0]:
                if o.request_id == "seeded":
                    got.extend(o.token_ids)
        outputs.append(got)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20
