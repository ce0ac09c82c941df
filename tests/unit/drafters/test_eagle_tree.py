"""EAGLE-2 dynamic trees: structure, batching consistency, losslessness in the engine."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    reference_greedy,
    run_to_completion,
    tiny_engine,
    tiny_hf_config,
)

from drafters.base import AcceptUpdate, DraftRequest
from drafters.eagle import EagleTreeDrafter
from drafters.eagle_model import EagleConfig, EagleDrafter
from server.engine.request import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    hf, target = tiny_pair
    torch.manual_seed(4)
    net = EagleDrafter(EagleConfig.from_target(tiny_hf_config()), target.embed_tokens.weight,
                       target.lm_head.weight).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return hf, target, net


def feed(drafter: EagleTreeDrafter, rid: str, tokens: list[int], hidden: int = 64) -> None:
    g = torch.Generator().manual_seed(len(tokens))
    drafter.on_accept([AcceptUpdate(rid, 0, tokens[:-1], torch.randn(len(tokens) - 1, hidden, generator=g),
                                    tokens[-1], reset=True)])


def test_pool_and_tree_structure(tiny):
    _, _, net = tiny
    d = EagleTreeDrafter(net, total_tokens=10, depth=3, top_k=3)
    feed(d, "a", [5, 6, 7, 8, 9])
    states = [d._context_pass(d.states["a"])]
    pool = d.expand(states, 3, 3)
    assert pool.tokens.shape == (1, 3 + 3 * 9)                       # k + depth * k^2
    parents = pool.parents[0].tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents))
    scores = pool.scores[0]
    assert all(scores[i] <= scores[p] + 1e-6 for i, p in enumerate(parents) if p >= 0)
    tree = d.propose([DraftRequest("a", [5, 6, 7, 8, 9], SamplingParams(), budget=10)])[0]
    assert len(tree) == 10 and tree.max_depth <= 4                   # depth + 1 at most


def test_batched_expansion_equals_one_by_one(tiny):
    _, _, net = tiny
    contexts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    solo = {}
    for rid, toks in contexts.items():
        d = EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3)
        feed(d, rid, toks)
        solo[rid] = d.propose([DraftRequest(rid, toks, SamplingParams(), 12)])[0]
    d = EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3)
    for rid, toks in contexts.items():
        feed(d, rid, toks)
    batched = d.propose([DraftRequest(rid, toks, SamplingParams(), 12) for rid, toks in contexts.items()])
    for (rid, _), tree in zip(contexts.items(), batched):
        assert tree.tokens == solo[rid].tokens and tree.parents == solo[rid].parents
        assert tree.scores == pytest.approx(solo[rid].scores, abs=1e-4)


@pytest.mark.parametrize("batch", [1, 8])
def test_random_eagle_drafter_is_lossless(tiny, batch):
    hf, target, net = tiny
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(3, 211, (6 + i,), generator=g).tolist() for i in range(batch)]
    engine = tiny_engine(target, num_blocks=256, drafter=EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3))
    reqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=25, temperature=0.0)) for i, p in enumerate(ps)]
    got = run_to_completion(engine, {})
    for i, p in enumerate(ps):
        assert got[f"r{i}"] == reference_greedy(hf, p, 25)
    assert all(r.spec.verify_steps > 0 and r.spec.drafted_tokens > 0 for r in reqs)
    assert engine.scheduler.kv.pool.usage == 0.0 and not engine.runner.drafter.states


def test_head_vocab_override_uses_shipped_frequencies(tiny, tmp_path):
    from drafters.eagle_model import FREQ_FILE, load_checkpoint, save_checkpoint

    _, target, net = tiny
    save_checkpoint(tmp_path, net, net.config)
    counts = torch.zeros(211, dtype=torch.long)
    counts[[7, 3, 150, 42, 9]] = torch.tensor([50, 40, 30, 20, 10])
    torch.save(counts, tmp_path / FREQ_FILE)
    top3 = load_checkpoint(tmp_path, target.embed_tokens, target.lm_head, head_vocab=3)
    assert top3.head_token_ids.tolist() == [3, 7, 150]
    assert top3.logits(torch.randn(2, 64)).shape == (2, 3)
    full = load_checkpoint(tmp_path, target.embed_tokens, target.lm_head, head_vocab=0)
    assert full.head_token_ids is None and full.logits(torch.randn(1, 64)).shape == (1, 211)
