"""SWIFT: the skipping forward, dynamic trees from the target itself, lossless greedy and sampling."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_drafter_lossless,
    chi2_pvalue,
    hf_model_from,
    native_from,
    tiny_engine,
    tiny_hf_config,
)

from drafters.accept import sample_accept
from drafters.base import DraftRequest
from drafters.swift import SwiftDrafter, _Chain, candidates_for
from drafters.swift_config import SwiftConfig
from drafters.swift_search import SearchConfig
from drafters.swift_skipset import SkipSet
from kernels import ReferenceBackend, SeqAttention, build_metadata
from server.engine.request import SamplingParams

LAYERS = 6


@pytest.fixture(scope="module")
def deep_pair():
    """A tiny random Llama with enough layers to skip some (first and last never are)."""
    cfg = tiny_hf_config(num_hidden_layers=LAYERS)
    hf = hf_model_from(cfg, seed=3)
    return hf, native_from(cfg, hf.state_dict())


def test_skipped_sublayers_pass_the_residual_and_write_no_kv(deep_pair):
    _, model = deep_pair
    c = model.config
    caches = [(torch.zeros(4, 4, c.num_key_value_heads, c.head_dim),
               torch.zeros(4, 4, c.num_key_value_heads, c.head_dim)) for _ in range(LAYERS)]
    backend = ReferenceBackend(4)
    ids, pos = torch.tensor([5, 9, 11]), torch.arange(3)
    meta = build_metadata([SeqAttention([0], 0, 3)], 4)
    with torch.inference_mode():
        full = model(ids, pos, caches, meta, backend)
        for k, v in caches:
            k.zero_()
            v.zero_()
        skipped = model(ids, pos, caches, meta, backend, skip_attn={2}, skip_mlp={3, 4})
    assert not torch.allclose(full, skipped)
    assert caches[2][0].abs().sum() == 0 and caches[1][0].abs().sum() > 0 and caches[3][0].abs().sum() > 0


def test_candidates_follow_confidence():
    levels, counts = (0.95, 0.8, 0.5), (3, 5, 8, 10)
    assert [candidates_for(p, levels, counts) for p in (0.99, 0.9, 0.6, 0.2)] == [3, 5, 8, 10]


def swift(max_tree_tokens=10, **search):
    config = SwiftConfig(search=SearchConfig(context_window=4, **search))
    return SwiftDrafter(LAYERS, max_tree_tokens, "tiny", config)


@pytest.mark.parametrize("batch", [1, 4])
def test_swift_greedy_equals_plain_greedy(deep_pair, batch):
    hf, target = deep_pair
    drafter = swift()
    assert_drafter_lossless(hf, target, drafter, batch, seed=batch, max_tokens=24, max_num_batched_tokens=32)
    search = drafter.store.get("tiny")
    assert search.history and search.iteration > 0          # the search ran while serving


def test_swift_sampled_tree_is_verified_exactly_with_its_q():
    """A depth of sampled candidates (chain + siblings drawn without replacement from q) verified with
    the tree's q: the first emitted token is distributed as the target's row."""
    torch.manual_seed(0)
    vocab = 8
    q_logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    target = torch.tensor([0.05, 0.30, 0.10, 0.20, 0.05, 0.15, 0.10, 0.05], dtype=torch.float64)
    params = SamplingParams(temperature=1.0, max_tokens=4)
    config = SwiftConfig(stop_threshold=0.99, sampling_candidates=(3, 3, 3, 3))
    gen, firsts = torch.Generator().manual_seed(1), []
    for _ in range(4000):
        chain = _Chain(DraftRequest("r", [1, 2, 3], params, budget=3), gen, 3)
        chain.grow(q_logits, config)
        tree = chain.tree(vocab)
        assert len(tree) == 3 and tree.parents == (-1, -1, -1) and chain.done
        probs = target.repeat(len(tree) + 1, 1)                                   # [n + 1, V]
        firsts.append(sample_accept(tree, probs, gen, tree.draft_probs).emitted[0])
    assert chi2_pvalue(firsts, target) > 1e-3


def test_sampled_swift_runs_and_keeps_the_pool_clean(deep_pair):
    _, target = deep_pair
    engine = tiny_engine(target, num_blocks=128, drafter=swift())
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7, draft_tokens=10)   # seeded: drafts if asked
    for i in range(3):
        engine.add_request(f"r{i}", [3 + i, 40, 50, 60, 70], params)
    drafted = 0
    while engine.has_unfinished():
        _, stats = engine.step()
        drafted += sum(stats.drafted)
    assert drafted > 0 and engine.scheduler.kv.pool.usage == 0.0


def test_a_loaded_finished_search_drafts_with_its_set_and_searches_no_more(tmp_path, deep_pair):
    drafter = swift()
    search = drafter.store.get("tiny")
    best = SkipSet(LAYERS, attn=(1, 3), mlp=(2,))
    search.best, search.done = best, True
    path = tmp_path / "skip.json"
    drafter.store.save(path)
    loaded = SwiftDrafter(LAYERS, 10, "tiny", SwiftConfig(skip_sets=str(path)))
    assert loaded.store.get("tiny").best == best and loaded.store.get("tiny").done
    hf, target = deep_pair
    assert_drafter_lossless(hf, target, loaded, 2, seed=9, max_tokens=16)
    assert loaded.store.get("tiny").iteration == 0


def test_requests_search_per_task_key_up_to_max_tasks(deep_pair):
    _, target = deep_pair
    drafter = SwiftDrafter(LAYERS, 8, "tiny", SwiftConfig(max_tasks=2, search=SearchConfig(context_window=4)))
    engine = tiny_engine(target, num_blocks=128, drafter=drafter)
    for i, task in enumerate(["code", "chat", None]):
        engine.add_request(f"r{i}", [5 + i, 20, 30, 40], SamplingParams(max_tokens=16, temperature=0.0, task=task))
    while engine.has_unfinished():
        engine.step()
    assert sorted(drafter.store.keys()) == ["code", "tiny"]          # "chat" would be a third: falls back
    assert drafter.store.get("code").history and drafter.store.get("tiny").history


def test_a_slow_bayesian_proposal_never_stalls_drafting(deep_pair):
    """The GP/UCB proposal runs in a worker thread: steps go on with the set in force until it is ready."""
    import threading

    _, target = deep_pair
    drafter = swift(bayes_interval=2)
    search = drafter.store.get("tiny")
    release, calls = threading.Event(), []
    plain_propose = search.propose

    def propose():
        if threading.current_thread().name.startswith("swift-search"):
            calls.append(search.iteration)
            assert release.wait(30)
        return plain_propose()

    search.propose = propose
    engine = tiny_engine(target, num_blocks=128, drafter=drafter)
    engine.add_request("r", [5, 20, 30, 40], SamplingParams(max_tokens=30, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    assert calls and "tiny" in drafter.pending and not drafter.pending["tiny"].done()   # finished while blocked
    release.set()
    drafter.pending["tiny"].result(timeout=30)
