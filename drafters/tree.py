"""Draft-tree data structure and EAGLE-2 rerank (numpy only, importable without torch).

Conventions (docs/ALGORITHMS.md §1): the root is the last committed token (the token the
target chose at the end of the previous round); it is *not* a node of :class:`DraftTree`.
Nodes ``0..n-1`` are draft tokens stored parent-before-child; ``parents[i] == -1`` marks a
child of the root. In the "with root" views (:meth:`DraftTree.ancestor_mask`,
:meth:`DraftTree.position_offsets`) row/column 0 is the root and node ``i`` is row ``i + 1``,
matching EAGLE's ``tree_mask`` / ``tree_position_ids`` layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DraftTree", "accepted_length", "rerank", "select_nodes"]


def _validate_parents(parents: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every parent index is ``-1`` or a strictly earlier node."""
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}; parents must satisfy -1 <= parent < index")


@dataclass(frozen=True)
class DraftTree:
    """An immutable draft tree of ``n`` nodes hanging below an implicit root.

    Attributes:
        tokens: draft token id of node ``i``.
        parents: parent node index of node ``i`` (``-1`` = child of the root); always ``< i``.
        scores: cumulative log-confidence of node ``i`` (sum of drafter log-probs on its path).
        draft_probs: for sampled drafts, a ``[n + 1, V]`` tensor: the distribution each row's children
            were drawn from, without replacement (row 0: the root's, row ``i + 1``: node ``i``'s), which
            lossless verification needs; ``None`` for deterministic (top-k) drafts (``q = 1``).
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    scores: tuple[float, ...]
    draft_probs: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))
        n = len(self.tokens)
        if len(self.parents) != n or len(self.scores) != n:
            raise ValueError(
                f"length mismatch: tokens={n} parents={len(self.parents)} scores={len(self.scores)}"
            )
        _validate_parents(self.parents)

    @classmethod
    def empty(cls) -> DraftTree:
        """A tree with no draft nodes (only the implicit root)."""
        return cls((), (), ())

    @classmethod
    def from_chain(cls, tokens: Sequence[int], scores: Sequence[float] | None = None) -> DraftTree:
        """A single root-to-leaf path: node ``i`` is the parent of node ``i + 1``.

        ``scores`` defaults to all zeros.
        """
        n = len(tokens)
        parents = tuple(range(-1, n - 1))
        return cls(tuple(tokens), parents, tuple(scores) if scores is not None else (0.0,) * n)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> np.ndarray:
        """Depth of every node, root children at depth 1.  # [n] int64"""
        depth = np.zeros(len(self), dtype=np.int64)  # [n]
        for i, p in enumerate(self.parents):
            depth[i] = 1 if p < 0 else depth[p] + 1
        return depth

    @property
    def max_depth(self) -> int:
        """Largest node depth (0 for the empty tree)."""
        return int(self.depths.max()) if len(self) else 0

    def children(self, i: int) -> list[int]:
        """Children of node ``i`` (``i = -1`` for the root) in ascending index order."""
        if not -1 <= i < len(self):
            raise IndexError(f"node {i} out of range for a tree of {len(self)} nodes")
        return [j for j, p in enumerate(self.parents) if p == i]

    def ancestor_mask(self, include_root: bool = True) -> np.ndarray:
        """Tree attention mask: ``mask[i, j]`` is True iff ``j`` is ``i`` or one of its ancestors.

        With ``include_root`` the mask is ``[n+1, n+1]`` with the root at row/column 0: the root
        row attends only to the root, and every node attends to the root, its ancestors and
        itself. Without it the mask is ``[n, n]`` over the draft nodes only.
        """
        n = len(self)
        mask = np.eye(n + 1, dtype=bool)  # [n+1, n+1]
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            mask[i + 1] |= mask[p + 1]
        return mask if include_root else mask[1:, 1:].copy()

    def position_offsets(self) -> np.ndarray:
        """Position offset of every row of the with-root layout: root 0, node ``i`` its depth.  # [n+1]"""
        return np.concatenate([np.zeros(1, dtype=np.int64), self.depths])

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as node-index lists (root excluded), one per leaf, leaves ascending.

        The empty tree has no paths.
        """
        has_child = [False] * len(self)
        for p in self.parents:
            if p >= 0:
                has_child[p] = True
        out: list[list[int]] = []
        for leaf, inner in enumerate(has_child):
            if inner:
                continue
            path = [leaf]
            while self.parents[path[-1]] >= 0:
                path.append(self.parents[path[-1]])
            out.append(path[::-1])
        return out


def select_nodes(parents: Sequence[int], scores: Sequence[float], budget: int) -> np.ndarray:
    """Pool indices (ascending) of the ``min(budget, len(pool))`` nodes kept by :func:`rerank`.

    Rule (ancestor closure is enforced, not assumed): visit pool nodes in descending score
    order, ties by ascending pool index. A visited node that is not yet selected is added
    *together with all its not-yet-selected ancestors* if that whole group still fits in the
    remaining budget, and skipped otherwise.

    The selection is ancestor-closed by construction, and it always ends with exactly
    ``min(budget, len(pool))`` nodes: if ``r >= 1`` slots were left at the end, the lowest-index
    unselected node ``u`` has a selected parent, so its missing ancestors ``A`` (``|A| >= r_t``,
    since ``u`` did not fit when visited with ``r_t`` slots left) were all added after that
    visit, using ``r_t - r >= |A| >= r_t`` slots -- a contradiction. When scores never increase
    from parent to child (the EAGLE-2 case: sums of log-probs) every visited node's group is
    just itself, so the result is exactly the plain top-``budget`` set under that order, as in
    the reference implementation.
    """
    par = np.asarray(parents, dtype=np.int64).reshape(-1)  # [P]
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)  # [P]
    n = par.shape[0]
    if sc.shape[0] != n:
        raise ValueError(f"length mismatch: parents={n} scores={sc.shape[0]}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if np.isnan(sc).any():
        raise ValueError("scores must not be NaN")
    _validate_parents(par.tolist())

    target = min(budget, n)
    order = np.argsort(-sc, kind="stable").tolist()  # [P] best first, ties by lower index
    par_list = par.tolist()
    selected = [False] * n
    count = 0
    for i in order:
        if count == target:
            break
        missing: list[int] = []
        j = i
        while j >= 0 and not selected[j]:
            missing.append(j)
            j = par_list[j]
        if missing and len(missing) <= target - count:
            for j in missing:
                selected[j] = True
            count += len(missing)
    assert count == target, "greedy closure selection always fills the budget (see docstring)"
    return np.flatnonzero(np.asarray(selected, dtype=bool)).astype(np.int64)


def rerank(
    tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float], budget: int
) -> DraftTree:
    """EAGLE-2 rerank: keep the best ``min(budget, len(pool))`` pool nodes as a :class:`DraftTree`.

    Args:
        tokens: draft token id of each pool node.  # [P]
        parents: pool index of each node's parent, ``-1`` for root children; parent-before-child.  # [P]
        scores: cumulative log-confidence of each pool node.  # [P]
        budget: number of draft nodes to keep (EAGLE's ``total_token - 1``).

    Selection follows :func:`select_nodes`. Kept nodes are re-indexed in ascending pool order
    (which keeps parents before children) and parent indices are remapped accordingly.
    """
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)  # [P]
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)  # [P]
    par = np.asarray(parents, dtype=np.int64).reshape(-1)  # [P]
    if tok.shape[0] != par.shape[0]:
        raise ValueError(f"length mismatch: tokens={tok.shape[0]} parents={par.shape[0]}")
    keep = select_nodes(par, sc, budget)  # [n]
    remap = np.full(par.shape[0] + 1, -1, dtype=np.int64)  # [P+1], slot P maps the root (-1)
    remap[keep] = np.arange(keep.shape[0])
    new_parents = remap[par[keep]]  # [n]; par == -1 indexes slot P -> -1
    return DraftTree(
        tuple(tok[keep].tolist()),
        tuple(new_parents.tolist()),
        tuple(sc[keep].tolist()),
    )


def accepted_length(tree: DraftTree, greedy: list[int]) -> int:
    """Depth of the deepest node whose path from the root matches ``greedy`` (parents come first)."""
    depth, matched, best = [0] * len(tree.tokens), [False] * len(tree.tokens), 0
    for n, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        depth[n] = 1 if parent < 0 else depth[parent] + 1
        matched[n] = (parent < 0 or matched[parent]) and depth[n] <= len(greedy) and token == greedy[depth[n] - 1]
        if matched[n]:
            best = max(best, depth[n])
    return best
