"""Hybrid drafter: lookup grafted onto a model tree (structure, scores, adaptive estimate), batching, losslessness."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    assert_batched_drafts_equal_solo,
    assert_matches_reference,
    feed_random_context,
    random_prompts,
    reference_greedy,
    tiny_engine,
    write_shard,
)

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.corpus import CorpusIndex
from drafters.eagle import EagleTreeDrafter
from drafters.hybrid import HybridConfig, HybridDrafter, either
from drafters.tree import DraftTree
from server.engine.request import SamplingParams

REPEATED = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]          # lookup: (9, 5, 6) -> 7 8 9 5 6
DISTINCT = [5, 6, 7, 8, 9, 10, 11]                       # lookup finds nothing


class FixedDrafter(Drafter):
    """A model drafter stub proposing one fixed tree (cut to the budget) to every request."""

    name = "fixed"

    def __init__(self, tree: DraftTree, max_tree_tokens: int = 16):
        self.tree, self.max_tree_tokens = tree, max_tree_tokens
        self.released: list[str] = []

    def propose(self, requests):
        return [DraftTree(self.tree.tokens[:r.budget], self.tree.parents[:r.budget], self.tree.scores[:r.budget])
                for r in requests]

    def release(self, request_id):
        self.released.append(request_id)


def ask(rid: str, tokens: list[int], budget: int) -> DraftRequest:
    return DraftRequest(rid, tokens, SamplingParams(), budget)


def scores_by_path(tree: DraftTree) -> dict[tuple[int, ...], float]:
    """Every node's score keyed by the tokens of its root-to-node path."""
    seqs: list[tuple[int, ...]] = []
    for tok, p in zip(tree.tokens, tree.parents):
        seqs.append((seqs[p] if p >= 0 else ()) + (tok,))
    return dict(zip(seqs, tree.scores))


def paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Token sequences of every root-to-node path."""
    return set(scores_by_path(tree))


def check_structure(tree: DraftTree) -> None:
    """Parent-before-child, siblings distinct, scores non-increasing along paths."""
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))
    assert len(set(zip(tree.parents, tree.tokens))) == len(tree)
    assert all(tree.scores[i] <= tree.scores[p] for i, p in enumerate(tree.parents) if p >= 0)


def commit(drafter: HybridDrafter, rid: str, tokens: list[int], accepted: list[int], bonus: int) -> list[int]:
    """Report one verify step for ``rid`` whose root is ``tokens[-1]``; returns the new committed tokens."""
    fed = [tokens[-1], *accepted]
    drafter.on_accept([AcceptUpdate(rid, len(tokens) - 1, fed, torch.zeros(len(fed), 64), bonus)])
    return tokens + accepted + [bonus]


@pytest.mark.parametrize("budget", [4, 10, 16])
def test_tree_structure_budget_and_lookup_path(tiny_eagle, budget):
    _, _, net = tiny_eagle
    d = HybridDrafter(EagleTreeDrafter(net, total_tokens=16, depth=3, top_k=3), HybridConfig(lookup_prior=0.9))
    feed_random_context(d, "a", REPEATED)
    tree = d.propose([ask("a", REPEATED, budget)])[0]
    assert len(tree) == budget                                # the model pool alone exceeds every budget
    check_structure(tree)
    if budget >= 10:                                          # after the random EAGLE's near-certain 4-chain
        assert (7, 8, 9, 5, 6) in paths(tree)                 # the whole lookup run (scores -0.1 * depth)
    eagle_alone = EagleTreeDrafter(net, total_tokens=16, depth=3, top_k=3)
    feed_random_context(eagle_alone, "a", REPEATED)
    assert (7, 8, 9) not in paths(eagle_alone.propose([ask("a", REPEATED, 16)])[0])  # lookup-only nodes


def test_no_lookup_match_returns_model_tree_unchanged(tiny_eagle):
    _, _, net = tiny_eagle
    d = HybridDrafter(EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3))
    eagle = EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3)
    for drafter in (d, eagle):
        feed_random_context(drafter, "a", DISTINCT)
    assert d.propose([ask("a", DISTINCT, 9)])[0] == eagle.propose([ask("a", DISTINCT, 9)])[0]


def test_shared_prefix_merges_and_scores_combine():
    model = DraftTree((7, 3, 8, 4), (-1, -1, 0, 2), (-0.2, -1.5, -0.9, -2.0))
    d = HybridDrafter(FixedDrafter(model), HybridConfig(lookup_prior=0.5))
    tokens = [1, 7, 8, 9, 2, 1]                               # (1,) -> 7 8 9 2 1
    d.on_accept([AcceptUpdate("a", 0, tokens[:-1], torch.zeros(5, 64), tokens[-1], reset=True)])
    tree = d.propose([ask("a", tokens, 16)])[0]
    check_structure(tree)
    assert len(tree) == 4 + 3                                 # 7 and 8 reused, 9 2 1 appended
    by_path = scores_by_path(tree)
    half = math.log(0.5)
    assert by_path[(7,)] == pytest.approx(either(-0.2, half)) and by_path[(7,)] > -0.2
    assert by_path[(7, 8)] == pytest.approx(either(-0.9, 2 * half)) and by_path[(7, 8)] > -0.9
    assert by_path[(3,)] == -1.5 and by_path[(7, 8, 4)] == -2.0          # model-only nodes keep their scores
    assert by_path[(7, 8, 9)] == pytest.approx(3 * half)                 # lookup-only: d * log p
    assert by_path[(7, 8, 9, 2, 1)] == pytest.approx(5 * half)
    small = d.propose([ask("a", tokens, 5)])[0]                          # rerank to the budget
    assert len(small) == 5 and paths(small) == {(7,), (7, 8), (7, 8, 9), (3,), (7, 8, 4)}
    capped = HybridDrafter(FixedDrafter(model), max_tree_tokens=6)
    capped.on_accept([AcceptUpdate("a", 0, tokens[:-1], torch.zeros(5, 64), tokens[-1], reset=True)])
    assert len(capped.propose([ask("a", tokens, 16)])[0]) == 6                    # min(budget, max_tree_tokens)


def test_either_is_at_least_each_and_safe():
    assert either(-1.0, -2.0) >= -1.0 and either(-1.0, -1.0) > -1.0
    assert either(-1e4, -2e4) == -1e4 and either(0.0, -3.0) == 0.0 and either(0.5, -1.0) == 0.5


def test_lookup_estimate_moves_with_what_is_committed():
    d = HybridDrafter(FixedDrafter(DraftTree.empty()), HybridConfig(lookup_prior=0.5, prior_weight=4, decay=1.0))
    start = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]                            # (1, 2, 3) -> 4 1 2 3 (4 1 2 3)
    for rid in ("copy", "open"):
        d.on_accept([AcceptUpdate(rid, 0, start[:-1], torch.zeros(10, 64), start[-1], reset=True)])
    assert d.lookup_acceptance("copy", 3) == d.lookup_acceptance("open", 3) == 0.5
    copy, open_ = start, start
    for step in range(4):
        d.propose([ask("copy", copy, 16), ask("open", open_, 16)])
        copy = commit(d, "copy", copy, [], copy[-4])                     # the target copies: one hit
        open_ = commit(d, "open", open_, [], 200 + step)                 # diverges: a miss, then no match
    assert d.lookup_acceptance("copy", 3) == pytest.approx((2 + 4) / (4 + 4))
    assert d.lookup_acceptance("open", 3) == pytest.approx(2 / (4 + 1))  # steps without a proposal learn nothing
    d.propose([ask("copy", copy, 16)])
    copy = commit(d, "copy", copy, copy[-4:-1], 99)                      # 3 lookup tokens accepted, bonus differs
    assert d.lookup_acceptance("copy", 3) == pytest.approx((2 + 7) / (4 + 8))
    assert d.states["copy"].lookup.trials.keys() == {3} and d.lookup_acceptance("copy", 1) == 0.5  # per match length
    d.release("copy")
    assert "copy" not in d.states and d.model.released == ["copy"]


def test_lookup_estimate_decays_old_evidence():
    d = HybridDrafter(FixedDrafter(DraftTree.empty()), HybridConfig(lookup_prior=0.5, prior_weight=1, decay=0.5))
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
    d.on_accept([AcceptUpdate("a", 0, tokens[:-1], torch.zeros(10, 64), tokens[-1], reset=True)])
    d.propose([ask("a", tokens, 16)])
    tokens = commit(d, "a", tokens, [4, 1, 2, 3], 4)                     # 5 hits
    d.propose([ask("a", tokens, 16)])
    commit(d, "a", tokens, [], 9)                                        # then a miss: hits 2.5, trials 3.5
    assert d.lookup_acceptance("a", 3) == pytest.approx((0.5 + 2.5) / (1 + 3.5))


def test_lookup_confidence_trades_lookup_depth_against_model_nodes():
    """A confident lookup estimate grows a long lookup run; a poor one leaves the model's tree."""
    model = DraftTree((50, 51, 52, 53, 54, 55), (-1, -1, -1, 0, 1, 2), (-0.5, -0.6, -0.7, -1.1, -1.2, -1.3))
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]                           # (1, 2, 3) -> 4 5 6 7 8 1 2 3

    def lookup_nodes(p: float) -> int:
        tree = HybridDrafter(FixedDrafter(model), HybridConfig(lookup_prior=p)).propose([ask("a", tokens, 6)])[0]
        check_structure(tree)
        return sum(1 for t in tree.tokens if t < 50)

    assert lookup_nodes(0.95) == 6 and lookup_nodes(0.5) == 1 and lookup_nodes(0.05) == 0


def test_batched_drafts_equal_one_by_one(tiny_eagle):
    _, _, net = tiny_eagle
    contexts = {"a": REPEATED, "b": [3, 4], "c": DISTINCT, "d": [20, 21, 22, 20, 21]}
    assert_batched_drafts_equal_solo(
        lambda: HybridDrafter(EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3)), contexts, 10)


def repetitive_prompts(batch: int, seed: int) -> list[list[int]]:
    """Random segments repeated three times, so prompt lookup has something to copy."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 211, (4 + i,), generator=g).tolist() * 3 for i in range(batch)]


def spy_lookup_acceptance(d: HybridDrafter) -> list[int]:
    """Wrap ``d`` to count, per verify step, accepted drafts that are not a path of the model's own tree."""
    model_trees: dict[str, DraftTree] = {}
    counts: list[int] = []
    model_propose, on_accept = d.model.propose, d.on_accept

    def propose(requests):
        trees = model_propose(requests)
        model_trees.update((r.request_id, t) for r, t in zip(requests, trees))
        return trees

    def accept(updates):
        for u in updates:
            tree = model_trees.pop(u.request_id, None)
            if tree is not None and len(u.fed_tokens) > 1 and tuple(u.fed_tokens[1:]) not in paths(tree):
                counts.append(len(u.fed_tokens) - 1)
        on_accept(updates)

    d.model.propose, d.on_accept = propose, accept
    return counts


@pytest.mark.parametrize("batch", [1, 8])
def test_hybrid_is_lossless_and_lookup_contributes(tiny_eagle, batch):
    hf, target, net = tiny_eagle
    d = HybridDrafter(EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3))
    lookup_accepted = spy_lookup_acceptance(d)
    engine = tiny_engine(target, num_blocks=256, drafter=d)
    reqs = assert_matches_reference(engine, hf, repetitive_prompts(batch, seed=2), max_tokens=25)
    assert all(r.spec.verify_steps > 0 and r.spec.drafted_tokens > 0 for r in reqs)
    assert sum(lookup_accepted) > 0                                      # lookup-only nodes were accepted
    assert not d.states and not d.model.states                           # released with the requests


def test_registry_builds_hybrid_on_eagle_with_profile_hook(tiny_eagle, tmp_path, monkeypatch):
    from drafters import registry
    from drafters.eagle_model import save_checkpoint
    from server.config import ServerConfig

    _, target, net = tiny_eagle
    save_checkpoint(tmp_path / "eagle", net, net.config)
    (tmp_path / "eagle" / "acceptance.json").write_text(json.dumps({"tau_by_budget": {"8": 1.5}}))
    monkeypatch.setitem(registry.SHIPPED, "SmolLM2-135M-Instruct",
                        {"eagle": tmp_path / "eagle", "hybrid": tmp_path / "hybrid"})
    cfg = ServerConfig(drafter="hybrid", max_draft_tokens=8, draft_head_vocab=0)
    d = registry.build_drafter("hybrid", cfg, target)
    assert isinstance(d, HybridDrafter) and isinstance(d.model, EagleTreeDrafter)
    assert d.name == "hybrid" and d.max_tree_tokens == 8 and d.acceptance_profile == {8: 1.5}  # eagle's
    (tmp_path / "hybrid").mkdir()
    (tmp_path / "hybrid" / "acceptance.json").write_text(json.dumps({"tau_by_budget": {"8": 2.5}}))
    assert registry.build_drafter("hybrid", cfg, target).acceptance_profile == {8: 2.5}           # hybrid's own
    with_path = cfg.model_copy(update={"drafter_path": str(tmp_path / "eagle")})
    assert registry.build_drafter("hybrid", with_path, target).acceptance_profile == {8: 1.5}


def test_corpus_tokens_are_grafted_and_their_estimate_learned_apart_from_lookup():
    corpus = CorpusIndex.from_records([[40, 41, 42, 43, 44, 45, 46]], max_ngram=3, min_ngram=2)
    d = HybridDrafter(FixedDrafter(DraftTree.empty()), HybridConfig(corpus_prior=0.5, prior_weight=4, decay=1.0),
                      corpus=corpus)
    tokens = [1, 2, 41, 42]                                              # no lookup match; corpus: (41, 42) -> 43 ..
    d.on_accept([AcceptUpdate("a", 0, tokens[:-1], torch.zeros(3, 64), tokens[-1], reset=True)])
    tree = d.propose([ask("a", tokens, 8)])[0]
    check_structure(tree)
    assert list(tree.tokens) == [43, 44, 45, 46]                             # the record ends after 46
    assert tree.scores == pytest.approx([math.log(0.5) * (i + 1) for i in range(4)])
    commit(d, "a", tokens, [43, 44], 99)                                 # 2 corpus tokens confirmed, then a miss
    assert d.corpus_acceptance("a", 2) == pytest.approx((2 + 2) / (4 + 3))
    assert d.lookup_acceptance("a", 2) == 0.7 and not d.states["a"].lookup.trials


@pytest.mark.parametrize("batch", [1, 8])
def test_hybrid_with_a_corpus_is_lossless_and_the_corpus_saves_steps(tiny_eagle, batch):
    """A corpus that holds the target's answers (and noise) shortens decoding; the output never changes."""
    hf, target, net = tiny_eagle
    prompts = random_prompts(batch, seed=5, min_len=6, max_len=12)
    answers = [reference_greedy(hf, p, 25) for p in prompts]
    g = torch.Generator().manual_seed(1)
    noise = [torch.randint(3, 211, (30,), generator=g).tolist() for _ in range(20)]
    corpus = CorpusIndex.from_records([p + a for p, a in zip(prompts, answers)] + noise)
    steps = {}
    for name, index in (("without", None), ("with", corpus)):
        d = HybridDrafter(EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3), corpus=index)
        reqs = assert_matches_reference(tiny_engine(target, num_blocks=256, drafter=d), hf, prompts, max_tokens=25)
        steps[name] = sum(r.spec.verify_steps for r in reqs)
        assert not d.states
    assert steps["with"] < steps["without"]


def test_registry_builds_the_corpus_from_the_option(tiny_eagle, tmp_path, monkeypatch):
    from drafters import registry
    from server.config import ServerConfig

    (tmp_path / "distill").mkdir()
    write_shard(tmp_path / "distill" / "shard_00000.npz", [([1, 2], [3, 4, 5, 6])])
    monkeypatch.setitem(registry.SHIPPED_CORPUS, "SmolLM2-135M-Instruct", [tmp_path / "distill"])
    auto = registry.corpus_index(ServerConfig())
    assert auto is not None and auto.num_tokens == 5
    assert registry.corpus_index(ServerConfig(hybrid=HybridConfig(corpus="none"))) is None
    assert registry.corpus_index(ServerConfig(model=str(tmp_path / "other-model"))) is None    # nothing shipped
    given = ServerConfig(model=str(tmp_path / "other-model"), hybrid=HybridConfig(corpus=str(tmp_path / "distill")))
    assert registry.corpus_index(given).num_tokens == 5


def test_config_validates():
    with pytest.raises(ValueError):
        HybridConfig(lookup_prior=1.0)
    with pytest.raises(ValueError):
        HybridConfig(min_ngram=3, max_ngram=2)
