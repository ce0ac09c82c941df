"""MEDUSA+ candidate generation and static trees: the best-first selection equals brute force over the
whole Cartesian product (ties included), is prefix-closed and parent-first, and has exactly the budget."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from drafters.medusa_tree import (
    build_tree,
    check_paths,
    dynamic_tree,
    load_static_tree,
    renormalised,
    save_static_tree,
    static_paths,
    static_tree,
    top_tuples,
)


def brute_force(marginals: list[np.ndarray], budget: int) -> list[tuple[tuple[int, ...], float]]:
    """Every tuple of depth 1..D with its joint (products left to right), sorted by (-joint, tuple)."""
    pool = []
    for depth in range(1, len(marginals) + 1):
        for node in itertools.product(*(range(len(m)) for m in marginals[:depth])):
            joint = 1.0
            for j, i in enumerate(node):
                joint = joint * float(marginals[j][i])
            pool.append((node, joint))
    pool.sort(key=lambda item: (-item[1], item[0]))
    return pool[:budget]


def random_marginals(rng: np.random.Generator, widths: list[int], ties: bool) -> list[np.ndarray]:
    out = []
    for k in widths:
        logits = rng.integers(0, 3, k).astype(float) if ties else rng.normal(0, 2, k)   # ties: few distinct values
        out.append(renormalised(np.sort(logits)[::-1][None])[0])
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_top_tuples_equal_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 5, int(rng.integers(1, 5)))]
    marginals = random_marginals(rng, widths, ties)
    total = sum(int(np.prod(widths[:d])) for d in range(1, len(widths) + 1))
    for budget in (1, 5, 17, total, total + 7):
        got = top_tuples(marginals, budget)
        want = brute_force(marginals, budget)
        assert [n for n, _ in got] == [n for n, _ in want]                 # same set, same order, ties included
        assert [j for _, j in got] == [j for _, j in want]
        assert len(got) == min(budget, total)


def test_selection_is_prefix_closed_and_parent_first_with_exact_ties():
    """All probabilities equal (K = 1 heads give p = 1: children tie with their parent)."""
    marginals = [np.ones(1), np.full(3, 1 / 3), np.ones(1), np.full(2, 0.5)]
    for budget in range(1, 12):
        nodes = [n for n, _ in top_tuples(marginals, budget)]
        seen = set()
        for n in nodes:
            assert len(n) == 1 or n[:-1] in seen
            seen.add(n)
        assert nodes == [n for n, _ in brute_force(marginals, budget)]


def test_dynamic_tree_structure_tokens_and_scores():
    rng = np.random.default_rng(0)
    logits = np.sort(rng.normal(0, 2, (4, 6)), axis=1)[:, ::-1]                   # [D, K] descending
    ids = rng.integers(0, 1000, (4, 6))
    tree = dynamic_tree(logits, ids, 20)
    probs = renormalised(logits)
    assert len(tree) == 20 and all(p < i for i, p in enumerate(tree.parents))
    want = brute_force(list(probs), 20)
    for n, (node, joint) in enumerate(want):
        assert tree.tokens[n] == ids[len(node) - 1, node[-1]]
        assert tree.scores[n] == pytest.approx(np.log(joint))
        parent = tree.parents[n]
        assert (parent == -1) == (len(node) == 1)
        if parent >= 0:
            assert want[parent][0] == node[:-1]
    assert tree.max_depth <= 4
    assert all(tree.scores[i] <= tree.scores[p] + 1e-12 for i, p in enumerate(tree.parents) if p >= 0)


def test_budget_larger_than_the_pool_keeps_everything():
    logits = np.array([[2.0, 1.0], [0.5, 0.0]])
    tree = dynamic_tree(logits, np.array([[5, 6], [7, 8]]), 100)
    assert len(tree) == 2 + 4 and tree.max_depth == 2


def test_renormalisation_is_over_the_top_k_only():
    logits = np.array([[3.0, 1.0, -1.0]])
    p = renormalised(logits)
    assert p.sum() == pytest.approx(1.0) and p[0, 0] == pytest.approx(np.exp(3) / (np.exp(3) + np.exp(1) + np.exp(-1)))


def test_unsorted_marginals_are_rejected():
    with pytest.raises(ValueError):
        top_tuples([np.array([0.2, 0.5])], 3)


def test_static_paths_follow_measured_accuracy():
    accuracy = [[0.6, 0.1, 0.05], [0.3, 0.5, 0.02], [0.2, 0.1, 0.0]]              # head 1: rank 1 beats rank 0
    paths = static_paths(accuracy, 8)
    assert len(paths) == 8 and check_paths(paths) == paths                         # prefix-closed, parent first
    expected = {p: np.prod([accuracy[d][r] for d, r in enumerate(p)]) for p in paths}
    assert paths[:3] == [(0,), (0, 1), (0, 0)]
    everything = {p: np.prod([accuracy[d][r] for d, r in enumerate(p)])
                  for depth in (1, 2, 3) for p in itertools.product(range(3), repeat=depth)}
    cutoff = min(expected.values())
    assert all(v <= cutoff + 1e-12 for p, v in everything.items() if p not in expected)   # the best 8 paths


def test_static_tree_truncates_to_budget_depth_and_ranks(tmp_path):
    paths = [(0,), (1,), (0, 0), (0, 1), (3,), (0, 0, 0), (1, 0)]
    save_static_tree(tmp_path / "t.json", paths, [[0.5, 0.2], [0.3]], {"note": "x"})
    assert json.loads((tmp_path / "t.json").read_text())["note"] == "x"
    loaded = load_static_tree(tmp_path / "t.json")
    assert loaded == paths
    logits = np.array([[2.0, 1.0, 0.5], [1.0, 0.0, -1.0]])                        # 2 heads, 3 ranks
    ids = np.array([[10, 11, 12], [20, 21, 22]])
    tree = static_tree(loaded, logits, ids, 4)
    assert tree.tokens == (10, 11, 20, 21) and tree.parents == (-1, -1, 0, 0)
    tree = static_tree(loaded, logits, ids, 100)                                   # (3,) and (0, 0, 0) do not fit
    assert tree.tokens == (10, 11, 20, 21, 20) and tree.parents == (-1, -1, 0, 0, 1)


@pytest.mark.parametrize("bad", [[[0, 1]], [[0], [0]], [[]], [[0], [-1]]])
def test_bad_static_paths_are_rejected(bad):
    with pytest.raises(ValueError):
        check_paths(bad)


def test_build_tree_scores_are_cumulative_logs():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    tree = build_tree([(1,), (1, 1)], np.array([[1, 2], [3, 4]]), probs)
    assert tree.tokens == (2, 4) and tree.scores == pytest.approx((np.log(0.5), np.log(0.5 * 0.75)))
