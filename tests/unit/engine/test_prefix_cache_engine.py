"""Prefix caching through the engine is lossless: identical outputs with the cache on and off, hits
reported per request, nothing leaked."""

from __future__ import annotations

import pytest
from helpers import random_prompts, reference_greedy, run_to_completion, tiny_engine

from drafters.eagle import EagleTreeDrafter
from drafters.hybrid import HybridConfig, HybridDrafter
from server.engine.request import SamplingParams


def shared_prefix_prompts():
    system = random_prompts(1, seed=11, min_len=30, max_len=31)[0]
    tails = random_prompts(6, seed=12, min_len=3, max_len=12)
    return [system + t for t in tails] + [system + tails[0]]          # the last one repeats the first exactly


@pytest.mark.parametrize("drafter_kind", [None, "eagle", "hybrid"])
def test_prefix_cache_is_lossless_and_reports_hits(tiny_eagle, drafter_kind):
    hf, target, net = tiny_eagle
    prompts = shared_prefix_prompts()
    outputs = {}
    for caching in (False, True):
        drafter = None
        if drafter_kind:
            drafter = EagleTreeDrafter(net, total_tokens=6, depth=3, top_k=2)
            drafter = HybridDrafter(drafter, HybridConfig()) if drafter_kind == "hybrid" else drafter
        engine = tiny_engine(target, num_blocks=128, drafter=drafter, prefix_caching=caching,
                             max_num_batched_tokens=16)
        params = SamplingParams(max_tokens=10, temperature=0.0)
        first = run_to_completion(engine, {"r0": (prompts[0], params)})       # fills the cache
        rest = {f"r{i}": (p, params) for i, p in enumerate(prompts) if i}
        cached = {}
        for rid, (ids, p) in rest.items():
            engine.add_request(rid, ids, p)
        got, prompt_tokens = dict(first), 0
        while engine.has_unfinished():
            outs, step = engine.step()
            prompt_tokens += step.num_prompt_tokens
            for o in outs:
                got.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finished:
                    cached[o.request_id] = o.num_cached_tokens
        outputs[caching] = got
        assert prompt_tokens == sum(len(ids) for ids, _ in rest.values())   # cached ones included, once
        assert engine.scheduler.kv.pool.usage == 0.0
        if caching:
            assert [cached[f"r{i}"] for i in range(1, 6)] == [28] * 5          # 7 full blocks of the 30-token system
            assert cached["r6"] == (len(prompts[6]) - 1) // 4 * 4              # the repeat: all but the last token
        else:
            assert not any(cached.values())
    assert outputs[True] == outputs[False]
    for i, p in enumerate(prompts):
        assert outputs[True][f"r{i}"] == reference_greedy(hf, p, 10)


def test_a_preempted_request_resumes_from_its_own_cached_blocks(tiny_pair):
    hf, target = tiny_pair
    prompts = random_prompts(4, seed=9, min_len=20, max_len=40)
    engine = tiny_engine(target, num_blocks=24, block_size=4, max_num_batched_tokens=16, prefix_caching=True)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    stats = []
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        outs, step = engine.step()
        stats.append(step)
        for o in outs:
            got[o.request_id].extend(o.token_ids)
    for i, p in enumerate(prompts):
        assert got[f"r{i}"] == reference_greedy(hf, p, 16)
    assert sum(s.num_preemptions for s in stats) > 0 and sum(s.prefix_hit_tokens for s in stats) > 0
    assert engine.scheduler.kv.pool.usage == 0.0
