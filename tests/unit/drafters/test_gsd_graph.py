"""GSD token graph (drafters/gsd_graph.py): thresholds, merging, the cycle guard, and the property that the
merged DAG unrolled to a tree is the un-merged tree when merging is exact (a Markov draft model)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drafters.gsd_config import GsdConfig
from drafters.gsd_graph import TokenGraph
from drafters.tree import DraftTree, rerank

Model = Callable[[list[int]], list[tuple[int, float]]]   # token path (context + graph path) -> candidates


def markov(seed: int, order: int, vocab: int) -> Model:
    """A draft model whose candidates depend only on the last ``order + 1`` tokens (coarse weights: exact ties
    and zero probabilities happen)."""

    def candidates(seq: list[int]) -> list[tuple[int, float]]:
        rng = random.Random(hash((seed, tuple(seq[-(order + 1):]))))
        weights = [rng.choice([0, 1, 1, 2, 3, 8]) for _ in range(vocab)]
        total = sum(weights)
        probs = [w / total for w in weights] if total else [1 / vocab] * vocab
        return sorted(((t, p) for t, p in enumerate(probs)), key=lambda c: (-c[1], c[0]))

    return candidates


def path_tokens(graph: TokenGraph, v: int) -> list[int]:
    out = []
    while v >= 0:
        out.append(graph.nodes[v].token)
        v = graph.nodes[v].parent
    return out[::-1]


def draft(model: Model, config: GsdConfig, context: list[int]) -> TokenGraph:
    """Run the drafting loop of one request: context[-1] is the root."""
    graph = TokenGraph(context[-1], config)
    while not graph.done:
        graph.expand([model(context[:-1] + path_tokens(graph, v)) for v in graph.pending])
    return graph


def paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    """Root-to-node token path of every node -> its score."""
    out: dict[tuple[int, ...], float] = {}
    keys: list[tuple[int, ...]] = []
    for tok, par, score in zip(tree.tokens, tree.parents, tree.scores):
        keys.append((keys[par] if par >= 0 else ()) + (tok,))
        out[keys[-1]] = score
    return out


def scripted(table: dict[tuple[int, ...], list[tuple[int, float]]]) -> Model:
    """Candidates looked up by the graph path (root first); unknown paths get none."""
    return lambda seq: table.get(tuple(seq[1:]), [])


configs = st.builds(
    GsdConfig,
    top_n=st.integers(1, 3),
    sibling_threshold=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    prob_threshold=st.sampled_from([0.0, 0.2, 0.3, 0.5]),
    repeat_threshold=st.integers(0, 2),
    max_steps=st.integers(1, 4),
    max_nodes=st.just(1024),
)


# ---------------------------------------------------------------- merged == un-merged (exact merging)


@settings(max_examples=300, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), vocab=st.integers(2, 5), budget=st.integers(0, 40),
       context=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_merged_unrolls_to_the_unmerged_tree(config: GsdConfig, seed: int, vocab: int, budget: int,
                                             context: list[int]) -> None:
    context = [t % vocab for t in context]
    model = markov(seed, config.repeat_threshold, vocab)
    merged = draft(model, config, context)
    plain = draft(model, config.model_copy(update={"repeat_threshold": -1}), context)
    assume(merged.stop_reason != "max_nodes" and plain.stop_reason != "max_nodes")
    assert plain.merges == 0
    assert merged.unroll() == plain.unroll()                       # same tokens, parents, scores, order
    assert paths(merged.unroll()) == paths(plain.unroll())
    assert merged.unroll(budget) == plain.unroll(budget)           # ties broken identically
    assert merged.steps == plain.steps and merged.stop_reason == plain.stop_reason
    assert merged.fed <= plain.fed and merged.calls <= plain.calls
    assert merged.unmerged_fed() == plain.fed == plain.unmerged_fed()
    assert merged.drafted <= plain.drafted


def test_merging_saves_forwards_on_a_repetitive_model() -> None:
    """A first-order chain over 3 tokens repeats constantly: merging must feed strictly fewer nodes."""
    config = GsdConfig(top_n=2, sibling_threshold=0.1, prob_threshold=0.0, repeat_threshold=0, max_steps=4)
    model = markov(3, 0, 3)
    merged = draft(model, config, [0])
    plain = draft(model, config.model_copy(update={"repeat_threshold": -1}), [0])
    assert merged.merges > 0 and merged.fed < plain.fed
    assert merged.unroll() == plain.unroll()


# ---------------------------------------------------------------- unroll is a valid, budgeted tree


@settings(max_examples=200, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), vocab=st.integers(2, 5), budget=st.integers(0, 40),
       order=st.integers(0, 3))
def test_unroll_is_the_rerank_of_the_full_tree(config: GsdConfig, seed: int, vocab: int, budget: int,
                                               order: int) -> None:
    """Also for non-Markov (inexact) merging: unroll(budget) is the full unrolled tree cut by drafters.tree's
    rerank, a valid ancestor-closed DraftTree of exactly min(budget, size) nodes with non-increasing scores."""
    graph = draft(markov(seed, order, vocab), config, [1, 0])
    full = graph.unroll()
    assert len(full) == sum(graph.unrolled_sizes()[1:])
    assert full.max_depth <= graph.steps and list(full.depths) == sorted(full.depths)   # depth-major
    cut = graph.unroll(budget)
    assert cut == rerank(full.tokens, full.parents, full.scores, budget)
    assert len(cut) == min(budget, len(full))
    for i, p in enumerate(cut.parents):
        assert p < i and (p < 0 or cut.scores[p] >= cut.scores[i])
    assert set(paths(cut)) <= set(paths(full))
    siblings: dict[int, list[int]] = {}
    for tok, p in zip(full.tokens, full.parents):
        siblings.setdefault(p, []).append(tok)
    assert all(len(set(t)) == len(t) for t in siblings.values())


@settings(max_examples=200, deadline=None)
@given(config=configs, seed=st.integers(0, 10_000), vocab=st.integers(2, 5), order=st.integers(0, 3))
def test_merges_are_acyclic_and_match_their_rule(config: GsdConfig, seed: int, vocab: int, order: int) -> None:
    graph = draft(markov(seed, order, vocab), config, [2, 1, 0])
    r = config.repeat_threshold
    for parent, node in enumerate(graph.nodes):
        for e in node.edges:
            target = graph.nodes[e.node]
            assert target.parent != parent or not e.pseudo
            if e.pseudo:
                assert not graph.reaches(e.node, parent)
                mine, theirs = path_tokens(graph, parent), path_tokens(graph, target.parent)
                assert min(len(mine), len(theirs)) >= r and mine[len(mine) - r:] == theirs[len(theirs) - r:]
    assert graph.fed == 1 + sum(1 for node in graph.nodes[1:] if node.depth < graph.steps)
    assert graph.fed <= 1 + graph.drafted


# ---------------------------------------------------------------- thresholds and stopping rules


def test_sibling_and_prob_thresholds_and_leaf_inheritance() -> None:
    config = GsdConfig(top_n=3, sibling_threshold=0.3, prob_threshold=0.3, repeat_threshold=-1, max_steps=3)
    table = {(): [(5, 0.5), (6, 0.2), (7, 0.1), (8, 0.05)],     # 0.1 < 0.3 * 0.5: dropped; 8 beyond top_n
             (5,): [(9, 0.9)], (6,): [(9, 0.9)], (5, 9): [(4, 0.1)], (6, 9): [(4, 0.9)]}
    graph = draft(scripted(table), config, [0])
    tree = graph.unroll()
    assert set(paths(tree)) == {(5,), (6,), (5, 9), (6, 9), (5, 9, 4), (6, 9, 4)}
    leaf = {tuple(path_tokens(graph, v)[1:]): graph.nodes[v].leaf for v in range(1, len(graph.nodes))}
    assert leaf == {(5,): False, (6,): True, (5, 9): False, (6, 9): True, (5, 9, 4): True, (6, 9, 4): True}
    assert graph.stop_reason == "leaves" and graph.steps == 3
    assert paths(tree)[(6, 9)] == pytest.approx(-1.7148, abs=1e-4)   # log 0.2 + log 0.9


def test_stops_when_a_step_adds_only_leaves() -> None:
    config = GsdConfig(top_n=2, sibling_threshold=0.1, prob_threshold=0.5, repeat_threshold=-1, max_steps=8)
    table = {(): [(1, 0.6), (2, 0.4)], (1,): [(3, 0.4), (4, 0.3)], (2,): [(5, 0.9)]}   # all depth-2 are leaves
    graph = draft(scripted(table), config, [0])
    assert graph.steps == 2 and graph.stop_reason == "leaves" and graph.calls == 2
    assert graph.fed == 3 and graph.pending == []


def test_max_steps_and_max_nodes() -> None:
    table_model = markov(1, 0, 4)
    deep = draft(table_model, GsdConfig(top_n=1, prob_threshold=0.0, max_steps=5, repeat_threshold=-1), [0])
    assert deep.steps == 5 and deep.stop_reason == "max_steps" and deep.unroll().max_depth == 5
    capped = draft(table_model, GsdConfig(top_n=4, sibling_threshold=0.0, prob_threshold=0.0, max_steps=8,
                                          max_nodes=6, repeat_threshold=-1), [0])
    assert capped.stop_reason == "max_nodes" and capped.drafted == 6


def test_merge_rules_and_cycle_guard() -> None:
    # step 1: root -> a(1), b(2); step 2: a -> c(3), b -> a (merged into a: same token, not b's ancestor);
    # step 3: c -> b: b is not on c's path but reaches c through its pseudo-child, so a new node is made.
    table = {(): [(1, 0.6), (2, 0.4)], (1,): [(3, 1.0)], (2,): [(1, 1.0)], (1, 3): [(2, 1.0)],
             (1, 3, 2): [(7, 1.0)]}
    config = GsdConfig(top_n=2, sibling_threshold=0.1, prob_threshold=0.0, repeat_threshold=0, max_steps=4)
    graph = draft(scripted(table), config, [0])
    b = graph.by_token[2][0]
    assert [e.pseudo for e in graph.nodes[b].edges] == [True] and graph.merges == 1
    assert len(graph.by_token[2]) == 2                            # the guarded candidate became a node
    assert (2, 1, 3, 2) in paths(graph.unroll())                  # the unrolled copy under b, re-expanded
    assert graph.fed == 1 + 2 + 1 + 1 and graph.unmerged_fed() == 1 + 2 + 2 + 2
    strict = draft(scripted(table), config.model_copy(update={"repeat_threshold": 1}), [0])
    assert strict.merges == 0                                     # a's parent (root 0) != b (2)


def test_merge_never_targets_an_ancestor() -> None:
    table = {(): [(1, 1.0)], (1,): [(1, 1.0)], (1, 1): [(1, 1.0)]}
    graph = draft(scripted(table), GsdConfig(prob_threshold=0.0, max_steps=3, repeat_threshold=0), [0])
    assert graph.merges == 0 and graph.drafted == 3


def test_expand_validates_its_input() -> None:
    graph = TokenGraph(0, GsdConfig())
    with pytest.raises(ValueError):
        graph.expand([])
    graph = draft(scripted({}), GsdConfig(), [0])
    assert graph.done and len(graph.unroll()) == 0
    with pytest.raises(RuntimeError):
        graph.expand([])
