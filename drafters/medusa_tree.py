"""Medusa candidate trees (numpy only): MEDUSA+ dynamic trees and static index-path trees.

A node is an index tuple ``(i_1, .., i_d)``: head ``j`` contributes its ``i_j``-th candidate at depth
``j``. MEDUSA+ (arXiv 2502.05947) scores a tuple by the product of per-head marginals ``p^(j)`` (each
head's top-K logits softmax-renormalised over those K) and keeps the ``budget`` best tuples of the
Cartesian product over depths 1..D. ``top_tuples`` finds them best-first without building the
``K + K^2 + .. + K^D`` pool: with every marginal sorted non-increasing and at most 1, a tuple's
*first child* ``t + (0,)`` and *next sibling* ``t[:-1] + (t[-1] + 1,)`` never score more than it, and
every tuple is reached from ``(0,)`` by exactly one chain of such moves, so popping a heap keyed by
``(-joint, tuple)`` yields the tuples in exactly that order (the key strictly increases along both
moves: a tie is broken by the tuple, and a prefix or an earlier sibling sorts first). The result is
the top ``budget`` under that order, prefix-closed (a prefix's key is smaller) and in parent-first
order, even on ties.

A static tree (``mc_sim_7b_63``-style) is a fixed list of index paths; ``static_paths`` builds one as
Medusa's simulation does, from per-head rank accuracies measured on held-out data: the expected
acceptance of a path is the product of its ranks' accuracies, and the best ``size`` paths are kept
(the same best-first selection, over ranks sorted by accuracy).
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drafters.tree import DraftTree

Path_ = tuple[int, ...]
STATIC_TREE_FILE = "static_tree.json"      # a checkpoint's static tree


def _check_marginals(marginals: Sequence[np.ndarray]) -> None:
    for j, m in enumerate(marginals):
        if len(m) and (np.any(np.diff(m) > 0) or m[0] > 1.0 or m[-1] < 0.0):
            raise ValueError(f"marginal {j} must be non-increasing within [0, 1]")


def top_tuples(marginals: Sequence[Sequence[float]], budget: int) -> list[tuple[Path_, float]]:
    """The ``min(budget, K_1 + K_1 K_2 + ..)`` index tuples of depth 1..D with the largest joint
    ``p^(1)_{i_1} * .. * p^(d)_{i_d}`` (products taken left to right), best first, ties by tuple.

    ``marginals[j]``: head ``j``'s probabilities, non-increasing. Returns ``(tuple, joint)`` pairs.
    """
    probs = [np.asarray(m, dtype=np.float64).reshape(-1) for m in marginals]   # D x [K_j]
    _check_marginals(probs)
    out: list[tuple[Path_, float]] = []
    if not probs or not len(probs[0]) or budget <= 0:
        return out
    heap: list[tuple[float, Path_, float]] = [(-float(probs[0][0]), (0,), 1.0)]   # (-joint, tuple, prefix joint)
    while heap and len(out) < budget:
        neg, node, prefix = heapq.heappop(heap)
        joint, depth = -neg, len(node)
        out.append((node, joint))
        if depth < len(probs) and len(probs[depth]):
            heapq.heappush(heap, (-(joint * probs[depth][0]), (*node, 0), joint))
        sibling = node[-1] + 1
        if sibling < len(probs[depth - 1]):
            heapq.heappush(heap, (-(prefix * probs[depth - 1][sibling]), (*node[:-1], sibling), prefix))
    return out


def renormalised(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (each head's top-K logits, descending): ``[D, K]`` -> ``[D, K]``."""
    z = np.exp(logits - logits[..., :1])
    return z / z.sum(-1, keepdims=True)


def build_tree(nodes: Sequence[Path_], token_ids: np.ndarray, probs: np.ndarray) -> DraftTree:
    """A ``DraftTree`` of prefix-closed, parent-first index tuples; ``token_ids [D, K]`` maps (depth,
    index) to a token, ``probs [D, K]`` gives the scores (log of the joint)."""
    index: dict[Path_, int] = {}
    tokens, parents, scores = [], [], []
    for n, node in enumerate(nodes):
        index[node] = n
        parent = index[node[:-1]] if len(node) > 1 else -1
        step = float(probs[len(node) - 1, node[-1]])
        tokens.append(int(token_ids[len(node) - 1, node[-1]]))
        parents.append(parent)
        scores.append((scores[parent] if parent >= 0 else 0.0) + (math.log(step) if step > 0 else -math.inf))
    return DraftTree(tuple(tokens), tuple(parents), tuple(scores))


def dynamic_tree(logits: np.ndarray, token_ids: np.ndarray, budget: int) -> DraftTree:
    """MEDUSA+: heads' top-K logits ``[D, K]`` (descending per head) and their tokens -> the ``budget``
    tuples with the largest joint of the renormalised marginals."""
    probs = renormalised(logits)
    return build_tree([node for node, _ in top_tuples(probs, budget)], token_ids, probs)


def static_paths(accuracy: Sequence[Sequence[float]], size: int) -> list[Path_]:
    """Medusa's simulation: the ``size`` rank paths with the largest product of per-head rank accuracies
    (``accuracy[j][r]``: share of held-out positions where head ``j``'s rank-``r`` candidate is the token),
    parent first."""
    orders = [np.argsort(-np.asarray(a, dtype=np.float64), kind="stable") for a in accuracy]
    ranked = [np.clip(np.asarray(a, dtype=np.float64)[o], 0.0, 1.0) for a, o in zip(accuracy, orders)]
    return [tuple(int(orders[d][i]) for d, i in enumerate(node)) for node, _ in top_tuples(ranked, size)]


def check_paths(paths: Sequence[Sequence[int]]) -> list[Path_]:
    """Paths as tuples; ``ValueError`` unless each path's parent (prefix) comes before it, with no repeats."""
    seen: set[Path_] = set()
    out = []
    for p in map(tuple, paths):
        if not p or p in seen or (len(p) > 1 and p[:-1] not in seen) or min(p) < 0:
            raise ValueError(f"static tree path {list(p)} is empty, repeated, negative or before its parent")
        seen.add(p)
        out.append(p)
    return out


def static_tree(paths: Sequence[Path_], logits: np.ndarray, token_ids: np.ndarray, budget: int) -> DraftTree:
    """The first ``budget`` of the static ``paths`` that fit the heads' ``[D, R]`` candidates (deeper paths
    and higher ranks are dropped; a prefix-closed list stays prefix-closed)."""
    depth, width = logits.shape
    fits = [p for p in paths if len(p) <= depth and max(p) < width][:budget]
    return build_tree(fits, token_ids, renormalised(logits))


def save_static_tree(path: str | Path, paths: Sequence[Path_], accuracy: Sequence[Sequence[float]],
                     note: dict | None = None) -> None:
    """``{"paths": [[0], [1], [0, 0], ..], "accuracy": per head per rank, ...note}`` as JSON."""
    body = {"paths": [list(p) for p in paths], "accuracy": [list(map(float, a)) for a in accuracy], **(note or {})}
    Path(path).write_text(json.dumps(body, indent=1))


def load_static_tree(path: str | Path) -> list[Path_]:
    """The checked index paths of a static tree file."""
    return check_paths(json.loads(Path(path).read_text())["paths"])
