"""Property tests for the draft-tree structure and the EAGLE-2 rerank (drafters/tree.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafters.tree import DraftTree, accepted_length, rerank, select_nodes

ROOT = Path(__file__).resolve().parents[3]

score_values = st.one_of(
    st.floats(-20.0, 0.0, allow_nan=False),
    st.sampled_from([0.0, -1.0, -2.0]),  # frequent exact ties
)


@st.composite
def pools(draw: st.DrawFn, max_size: int = 40) -> tuple[list[int], list[float]]:
    """A random parent-before-child pool: (parents, scores) with arbitrary (non-monotone) scores."""
    n = draw(st.integers(0, max_size))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    scores = [draw(score_values) for _ in range(n)]
    return parents, scores


@st.composite
def monotone_pools(draw: st.DrawFn, max_size: int = 40) -> tuple[list[int], list[float]]:
    """A pool whose scores never increase from parent to child (sums of log-probs)."""
    parents, _ = draw(pools(max_size))
    scores: list[float] = []
    for p in parents:
        step = draw(st.one_of(st.just(0.0), st.floats(0.0, 5.0, allow_nan=False)))
        scores.append((0.0 if p < 0 else scores[p]) - step)
    return parents, scores


@st.composite
def trees(draw: st.DrawFn) -> DraftTree:
    """A random valid DraftTree."""
    parents, scores = draw(pools())
    tokens = [draw(st.integers(0, 50)) for _ in parents]
    return DraftTree(tuple(tokens), tuple(parents), tuple(scores))


def ancestors(parents: tuple[int, ...] | list[int], i: int) -> list[int]:
    """Strict ancestors of node ``i`` (root excluded), nearest first."""
    out = []
    while parents[i] >= 0:
        i = parents[i]
        out.append(i)
    return out


def plain_order(scores: list[float]) -> list[int]:
    """Pool indices by descending score, ties by ascending index."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


# ---------------------------------------------------------------- DraftTree


def test_validation() -> None:
    with pytest.raises(ValueError):
        DraftTree((1, 2), (-1,), (0.0, 0.0))
    with pytest.raises(ValueError):
        DraftTree((1, 2), (1, -1), (0.0, 0.0))  # child before parent
    with pytest.raises(ValueError):
        DraftTree((1,), (0,), (0.0,))  # self-parent
    with pytest.raises(ValueError):
        DraftTree((1,), (-2,), (0.0,))


def test_empty_and_chain() -> None:
    empty = DraftTree.empty()
    assert len(empty) == 0 and empty.max_depth == 0 and empty.paths() == []
    assert empty.ancestor_mask().tolist() == [[True]]
    assert empty.ancestor_mask(include_root=False).shape == (0, 0)
    assert empty.position_offsets().tolist() == [0]
    assert empty.children(-1) == []

    chain = DraftTree.from_chain([7, 8, 9], [-0.1, -0.2, -0.3])
    assert chain.parents == (-1, 0, 1) and chain.scores == (-0.1, -0.2, -0.3)
    assert chain.depths.tolist() == [1, 2, 3] and chain.max_depth == 3
    assert chain.paths() == [[0, 1, 2]]
    assert chain.ancestor_mask(include_root=False).tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    assert DraftTree.from_chain([4, 5]).scores == (0.0, 0.0)


def test_small_tree_by_hand() -> None:
    #        root
    #       /    \
    #      0      1
    #     / \      \
    #    2   3      4
    tree = DraftTree((10, 11, 12, 13, 14), (-1, -1, 0, 0, 1), (0.0,) * 5)
    assert tree.children(-1) == [0, 1] and tree.children(0) == [2, 3] and tree.children(2) == []
    assert tree.paths() == [[0, 2], [0, 3], [1, 4]]
    assert tree.position_offsets().tolist() == [0, 1, 1, 2, 2, 2]
    mask = tree.ancestor_mask().astype(int).tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]


@settings(max_examples=200, deadline=None)
@given(trees())
def test_mask_depth_path_consistency(tree: DraftTree) -> None:
    n = len(tree)
    mask = tree.ancestor_mask()  # [n+1, n+1]
    depths = tree.depths  # [n]
    assert mask.shape == (n + 1, n + 1) and mask.dtype == bool
    assert mask[0].tolist() == [True] + [False] * n
    assert mask[:, 0].all()
    assert np.array_equal(tree.ancestor_mask(include_root=False), mask[1:, 1:])
    assert np.array_equal(tree.position_offsets(), mask.sum(1) - 1)
    assert tree.max_depth == (int(depths.max()) if n else 0)

    for i in range(n):
        anc = ancestors(tree.parents, i)
        assert set(np.flatnonzero(mask[i + 1, 1:]).tolist()) == set(anc) | {i}
        assert depths[i] == len(anc) + 1  # ancestors including the root
        assert tree.children(i) == [j for j in range(n) if tree.parents[j] == i]
    assert tree.children(-1) == [j for j in range(n) if tree.parents[j] == -1]

    paths = tree.paths()
    leaves = [p[-1] for p in paths]
    assert leaves == sorted(leaves)
    assert leaves == [i for i in range(n) if not tree.children(i)]
    assert {i for path in paths for i in path} == set(range(n))  # every node lies on a path
    for path in paths:
        assert tree.parents[path[0]] == -1
        assert all(tree.parents[b] == a for a, b in itertools.pairwise(path))
        leaf = path[-1]
        assert set(np.flatnonzero(mask[leaf + 1, 1:]).tolist()) == set(path)
        assert len(path) == depths[leaf]


# ---------------------------------------------------------------- rerank


@settings(max_examples=300, deadline=None)
@given(pools(), st.integers(0, 50))
def test_rerank_closure_order_and_budget(pool: tuple[list[int], list[float]], budget: int) -> None:
    parents, scores = pool
    n = len(parents)
    tokens = list(range(n))  # token == pool index, so the output identifies the kept pool nodes
    tree = rerank(tokens, parents, scores, budget)
    kept = list(tree.tokens)

    assert len(tree) == min(budget, n)
    assert kept == sorted(kept) and kept == select_nodes(parents, scores, budget).tolist()
    kept_set = set(kept)
    for new_i, pool_i in enumerate(kept):
        assert set(ancestors(parents, pool_i)) <= kept_set  # ancestor closure
        p = parents[pool_i]
        assert tree.parents[new_i] == (-1 if p < 0 else kept.index(p))
        assert tree.parents[new_i] < new_i  # parent before child
        assert tree.scores[new_i] == scores[pool_i]


@settings(max_examples=200, deadline=None)
@given(pools(), st.integers(0, 50))
def test_rerank_keeps_top_node(pool: tuple[list[int], list[float]], budget: int) -> None:
    parents, scores = pool
    if not parents:
        return
    best = plain_order(scores)[0]
    kept = select_nodes(parents, scores, budget).tolist()
    if len(ancestors(parents, best)) + 1 <= budget:
        assert best in kept


@settings(max_examples=300, deadline=None)
@given(monotone_pools(), st.integers(0, 50))
def test_rerank_monotone_is_plain_topk(pool: tuple[list[int], list[float]], budget: int) -> None:
    parents, scores = pool
    kept = select_nodes(parents, scores, budget).tolist()
    assert kept == sorted(plain_order(scores)[:budget])
    if parents and budget:
        assert plain_order(scores)[0] in kept


def test_rerank_enforces_closure_on_non_monotone_scores() -> None:
    # A deep child outscoring its ancestors must bring them along, within the budget.
    tokens, parents, scores = [10, 11, 12, 13], [-1, 0, 1, -1], [-5.0, -4.0, 0.0, -1.0]
    assert rerank(tokens, parents, scores, 3) == DraftTree((10, 11, 12), (-1, 0, 1), (-5.0, -4.0, 0.0))
    # Budget 2 cannot hold node 2 with its ancestors: take the root child 3, then the best fit.
    assert select_nodes(parents, scores, 2).tolist() == [0, 3]
    assert rerank(tokens, parents, scores, 0) == DraftTree.empty()


def test_rerank_ties_prefer_lower_index() -> None:
    tree = rerank([5, 6, 7, 8], [-1, -1, -1, 0], [-1.0, -1.0, -1.0, -1.0], 2)
    assert tree == DraftTree((5, 6), (-1, -1), (-1.0, -1.0))


def test_rerank_rejects_bad_pool() -> None:
    with pytest.raises(ValueError):
        rerank([1, 2], [1, -1], [0.0, 0.0], 2)
    with pytest.raises(ValueError):
        rerank([1, 2], [-1, 0], [0.0, float("nan")], 2)
    with pytest.raises(ValueError):
        rerank([1, 2], [-1, 0], [0.0, 0.0], -1)


def test_tree_module_does_not_import_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, drafters.tree; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_accepted_length_is_the_deepest_fully_matching_path():
    #        root
    #       /    \
    #    5 (0)   7 (1)
    #     |        |
    #    6 (2)    8 (3)
    #     |
    #    9 (4)
    tree = DraftTree((5, 7, 6, 8, 9), (-1, -1, 0, 1, 2), (0.0,) * 5)
    assert accepted_length(tree, [5, 6, 9]) == 3
    assert accepted_length(tree, [5, 6, 1]) == 2
    assert accepted_length(tree, [7, 8, 9]) == 2
    assert accepted_length(tree, [7, 6, 9]) == 1          # node 2 matches depth 2 but hangs below 5
    assert accepted_length(tree, [1, 6, 9]) == 0
    assert accepted_length(DraftTree.empty(), [5]) == 0
