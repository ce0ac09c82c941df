"""Draft-model drafter on tiny random models: losslessness, its own KV, the node interface, batching."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_batched_drafts_equal_solo,
    assert_drafter_lossless,
    hf_model_from,
    native_from,
    run_to_completion,
    tiny_engine,
    tiny_hf_config,
)

from drafters.base import AcceptUpdate, DraftRequest
from drafters.draft_model import DraftModelDrafter
from kernels import SeqAttention, get_backend
from server.engine.request import SamplingParams


@pytest.fixture(scope="module")
def tiny_draft():
    """A random one-layer Llama over the tiny target's vocabulary (a different model from the target)."""
    cfg = tiny_hf_config(num_hidden_layers=1)
    return native_from(cfg, hf_model_from(cfg, seed=3).state_dict())


def make(model, depth: int = 3, top_k: int = 2, max_tree: int = 8, chunk: int = 128) -> DraftModelDrafter:
    return DraftModelDrafter.create(model, 2048, max_tree, depth, top_k, chunk)


def committed(drafter: DraftModelDrafter, rid: str, tokens: list[int]) -> None:
    """Tell the drafter that ``tokens`` (the last one the root) are committed, as a prefill would."""
    drafter.on_accept([AcceptUpdate(rid, 0, tokens[:-1], torch.zeros(len(tokens) - 1, 1), tokens[-1], reset=True)])


def ask(rid: str, tokens: list[int], budget: int = 8) -> DraftRequest:
    return DraftRequest(rid, tokens, SamplingParams(temperature=0.0), budget)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_lossless_random_draft(tiny_pair, tiny_draft, batch):
    hf, target = tiny_pair
    assert_drafter_lossless(hf, target, make(tiny_draft), batch=batch, seed=batch)


def test_self_draft_is_lossless_and_accepts_whole_chains(tiny_pair):
    """Drafting with a copy of the target: greedy output unchanged and (the draft KV being right) nearly every
    step accepts its whole top-1 chain (depth 3, top_k 1: four tokens); chunked prefill (8-token steps,
    4-token absorb chunks) on the way."""
    hf, target = tiny_pair
    drafter = make(copy.deepcopy(target), depth=3, top_k=2, chunk=4)
    assert_drafter_lossless(hf, target, drafter, batch=3, seed=7, max_tokens=30, max_num_batched_tokens=8)
    engine = tiny_engine(target, num_blocks=256, drafter=make(copy.deepcopy(target), depth=3, top_k=1))
    reqs = [engine.add_request(f"r{i}", list(range(5 + i, 25 + i)), SamplingParams(max_tokens=24, temperature=0.0))
            for i in range(2)]
    run_to_completion(engine, {})
    for r in reqs:
        assert r.spec.accepted_tokens / r.spec.verify_steps >= 3.5      # at most 4 per step


def test_sampled_requests_get_deterministic_drafts(tiny_pair):
    """Sampled requests (seeded, naming a budget) are drafted like greedy ones: top-k trees with no draft
    distribution (verified with q = 1, exact: drafters/accept.py), accepted, the pools clean afterwards."""
    _, target = tiny_pair
    drafter = make(copy.deepcopy(target))
    tokens = [7, 8, 9, 10, 11]
    sampled = drafter.propose([DraftRequest("s", tokens, SamplingParams(temperature=0.8, seed=3), 8)])[0]
    drafter.release("s")
    assert sampled.draft_probs is None and sampled == drafter.propose([ask("g", tokens)])[0]
    drafter.release("g")
    engine = tiny_engine(target, num_blocks=256, drafter=drafter)
    params = SamplingParams(max_tokens=20, temperature=0.05, seed=11, draft_tokens=6)   # peaked: drafts accepted
    reqs = [engine.add_request(f"s{i}", list(range(7 + i, 19 + i)), params) for i in range(2)]
    run_to_completion(engine, {})
    assert all(r.spec.drafted_tokens > 0 and r.spec.accepted_tokens > 0 for r in reqs)
    assert engine.scheduler.kv.pool.usage == 0.0 and not drafter.states and drafter.kv.num_free == 2048


def fresh_kv(model, tokens: list[int]) -> list[torch.Tensor]:
    """Per layer, the keys and values ``[2, n, Hkv, D]`` a fresh drafter computes for ``tokens``."""
    d = make(model)
    d.propose([ask("x", tokens)])
    return slot_kv(d, "x", len(tokens))


def slot_kv(drafter: DraftModelDrafter, rid: str, n: int) -> list[torch.Tensor]:
    slots = torch.tensor(drafter.kv.table(rid)[:n])
    return [torch.stack([k[slots, 0], v[slots, 0]]) for k, v in drafter.kv.caches]


def test_draft_kv_after_acceptance_equals_fresh_prefill(tiny_draft):
    """Accept a drafted path (its nodes' scratch KV written), then a few plain steps: the draft KV of the
    committed tokens equals a fresh prefill's."""
    d = make(tiny_draft, depth=3, top_k=3)
    tokens = [5, 17, 33, 2, 90, 41, 7]
    committed(d, "r", tokens)
    for bonus in (12, 60, 3):
        tree = d.propose([ask("r", tokens)])[0]
        path = max(tree.paths(), key=len)
        accepted = [tree.tokens[i] for i in path[:2]]
        d.on_accept([AcceptUpdate("r", len(tokens) - 1, [tokens[-1], *accepted], torch.zeros(3, 1), bonus)])
        tokens = [*tokens, *accepted, bonus]
    d.propose([ask("r", tokens)])
    assert d.states["r"].length == len(tokens)
    for got, want in zip(slot_kv(d, "r", len(tokens)), fresh_kv(tiny_draft, tokens)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def causal_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """Next-token log-probs ``[V]`` after ``tokens`` by one causal forward over a fresh cache."""
    cfg = model.config
    shape = (1, len(tokens), cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    backend = get_backend(len(tokens))
    meta = backend.build_metadata([SeqAttention([0], 0, len(tokens))])
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), caches, meta, backend)
        return model.compute_logits(hidden[-1]).float().log_softmax(-1)


def test_forward_nodes_attend_to_context_and_ancestors(tiny_draft):
    """Nodes fed over two calls (parents across calls, two requests): each node's log-probs equal a causal
    forward over the context plus its root-to-node path."""
    d = make(tiny_draft)
    ctx = {"a": [4, 8, 15, 16, 23], "b": [42, 7, 9]}
    roots = d.start([ask(rid, toks) for rid, toks in ctx.items()])
    for (rid, toks), root in zip(ctx.items(), roots):
        torch.testing.assert_close(root, causal_logprobs(tiny_draft, toks), atol=1e-4, rtol=1e-4)
    nodes = {"a": ([30, 31], [-1, -1]), "b": ([50], [-1])}
    first = d.forward_nodes(list(nodes), [v[0] for v in nodes.values()], [v[1] for v in nodes.values()])
    more = {"a": ([32, 33, 34], [1, 0, 3]), "b": ([51, 52], [0, -1])}
    second = d.forward_nodes(list(more), [v[0] for v in more.values()], [v[1] for v in more.values()])
    for i, (rid, context) in enumerate(ctx.items()):
        toks, pars = nodes[rid][0] + more[rid][0], nodes[rid][1] + more[rid][1]
        got = torch.cat([first[i], second[i]])
        for j in range(len(toks)):
            path, p = [], j
            while p >= 0:
                path.insert(0, toks[p])
                p = pars[p]
            torch.testing.assert_close(got[j], causal_logprobs(tiny_draft, context + path), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="parent"):
        d.forward_nodes(["b"], [[1]], [[9]])


def test_batched_drafts_equal_solo(tiny_draft):
    contexts = {"a": [5, 9, 13, 77, 2, 8], "b": [100, 4], "c": list(range(20, 45))}
    assert_batched_drafts_equal_solo(lambda: make(tiny_draft, depth=3, top_k=3), contexts, budget=7)


def test_long_prompt_is_absorbed_in_chunks(tiny_draft, monkeypatch):
    """Prefill chunks reaching ``chunk`` tokens are absorbed from ``on_accept``, no forward over more than
    ``chunk`` tokens of one request."""
    d = make(tiny_draft, chunk=8)
    sizes = []
    forward = d._forward
    monkeypatch.setattr(d, "_forward", lambda ids, pos, seqs: sizes.append(max(s.num_new for s in seqs))
                        or forward(ids, pos, seqs))
    prompt = list(range(3, 63))
    for start in range(0, 60, 20):
        d.on_accept([AcceptUpdate("r", start, prompt[start:start + 20], torch.zeros(20, 1),
                                  prompt[min(start + 20, 59)], reset=start == 0)])
    assert d.states["r"].length >= 56 and max(sizes) <= 8
    tree = d.propose([ask("r", prompt)])[0]
    assert len(tree) == 8 and max(sizes) <= 8
    for got, want in zip(slot_kv(d, "r", 60), fresh_kv(tiny_draft, prompt)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_full_draft_kv_drafts_nothing_and_recovers(tiny_draft):
    d = DraftModelDrafter.create(tiny_draft, 40, 8, 3, 2)
    trees = d.propose([ask("a", list(range(3, 30))), ask("b", list(range(3, 30)))])
    assert len(trees[0]) == 8 and len(trees[1]) == 0                   # 27 + 6 scratch slots fit once
    d.release("a")
    assert len(d.propose([ask("b", list(range(3, 30)))])[0]) == 8
    d.release("b")
    assert d.kv.num_free == 40
