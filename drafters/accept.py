"""Verification of a draft tree against the target model's outputs (greedy and lossless sampling).

Row layout of every target/draft tensor follows :meth:`DraftTree.ancestor_mask`: row 0 is the
target's prediction after the root (the last committed token) and row ``i + 1`` its prediction
after draft node ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drafters.tree import DraftTree

__all__ = ["AcceptResult", "greedy_accept", "sample_accept"]


@dataclass
class AcceptResult:
    """Outcome of verifying one draft tree.

    Attributes:
        nodes: accepted node indices, root's child first, deepest last (empty if none accepted).
        tokens: the accepted draft tokens, ``tokens[j] == tree.tokens[nodes[j]]``.
        bonus: the token the target emits after the deepest accepted node (next round's root).
    """

    nodes: list[int]
    tokens: list[int]
    bonus: int

    @property
    def accept_length(self) -> int:
        """Number of accepted draft tokens (tokens committed this round = ``accept_length + 1``)."""
        return len(self.nodes)

    @property
    def emitted(self) -> list[int]:
        """All tokens produced this round: the accepted drafts followed by the bonus token."""
        return [*self.tokens, self.bonus]


def _child_lists(tree: DraftTree) -> list[list[int]]:
    """Children of every row in ascending index order: entry 0 is the root, entry ``i + 1`` node ``i``."""
    kids: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, p in enumerate(tree.parents):
        kids[p + 1].append(i)
    return kids


def _check_rows(name: str, t: torch.Tensor, tree: DraftTree, ndim: int) -> None:
    """Raise ``ValueError`` unless ``t`` has ``ndim`` dims and one row per tree row (``n + 1``)."""
    if t.dim() != ndim or t.shape[0] != len(tree) + 1:
        raise ValueError(f"{name} must have {ndim} dims and {len(tree) + 1} rows, got {tuple(t.shape)}")


def greedy_accept(tree: DraftTree, target_argmax: torch.Tensor) -> AcceptResult:
    """Accept the longest root-to-node path whose tokens all equal the target's argmax.

    Args:
        tree: the draft tree that was verified.
        target_argmax: target argmax token after the root (row 0) and after each node
            (row ``i + 1``).  # [n+1] int64

    At each accepted node the first child (lowest index) whose token equals that node's argmax
    row is taken; distinct siblings make this the only match. The bonus is the argmax row of
    the deepest accepted node, or of the root when nothing is accepted.
    """
    _check_rows("target_argmax", target_argmax, tree, 1)
    best = target_argmax.tolist()  # [n+1]
    kids = _child_lists(tree)
    nodes: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in kids[row] if tree.tokens[c] == best[row]), None)
        if nxt is None:
            break
        nodes.append(nxt)
        row = nxt + 1
    return AcceptResult(nodes, [tree.tokens[i] for i in nodes], int(best[row]))


def _normalised(v: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``v / v.sum()``, or ``fallback`` when ``v`` carries no mass (numerically degenerate case)."""
    total = v.sum()
    return v / total if total.item() > 0 else fallback


def sample_accept(
    tree: DraftTree,
    target_probs: torch.Tensor,
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> AcceptResult:
    """Lossless recursive rejection sampling over a draft tree (SpecInfer / EAGLE-2 / Sequoia).

    Args:
        tree: the draft tree that was verified.
        target_probs: target next-token probabilities after the root (row 0) and after each node
            (row ``i + 1``), already temperature / top-p / top-k processed.  # [n+1, V]
        generator: the only source of randomness (``torch.rand`` / ``torch.multinomial``); it
            must live on ``target_probs.device``.
        draft_probs: for each row, the distribution that row's children were sampled from.
            ``None`` means deterministic (top-k) children, i.e. ``q = 1``.  # [n+1, V]

    Walk from the root with residual ``p`` = the current row of ``target_probs``; try the
    children in index order, skipping tokens already tried among those siblings:

    * ``q = 1``: accept child token ``x`` with probability ``p[x]``; on rejection zero ``p[x]``
      and renormalise (EAGLE-2 ``evaluate_posterior``).
    * sampled drafts: accept with probability ``min(1, p[x] / q[x])``; on rejection
      ``p <- norm(max(p - q, 0))`` and ``q <- norm(q with x zeroed)``. This is exact when a
      node's children were drawn *without replacement* from ``q`` (each draw from ``q`` with
      the earlier draws zeroed and renormalised, e.g. ``torch.multinomial(q, k)``).

    On acceptance the walk descends to that child with a fresh residual from its row. When no
    child is accepted, or the node is a leaf, the bonus token is sampled from the residual ``p``.
    The emitted sequence (accepted tokens, then bonus) is distributed exactly as sampling the
    target autoregressively.
    """
    _check_rows("target_probs", target_probs, tree, 2)
    if draft_probs is not None:
        _check_rows("draft_probs", draft_probs, tree, 2)
        if draft_probs.shape != target_probs.shape:
            raise ValueError(
                f"draft_probs {tuple(draft_probs.shape)} != target_probs {tuple(target_probs.shape)}"
            )
    kids = _child_lists(tree)
    nodes: list[int] = []
    row = 0
    while True:
        p_row = target_probs[row].to(torch.float64)  # [V]
        p = _normalised(p_row, p_row)  # [V]
        q = None
        if draft_probs is not None:
            q_row = draft_probs[row].to(torch.float64)  # [V]
            q = _normalised(q_row, q_row)  # [V]
        children = kids[row]
        u = torch.rand(len(children), generator=generator, dtype=torch.float64, device=p.device).tolist()
        tried: set[int] = set()
        accepted = None
        for c, r in zip(children, u):
            x = tree.tokens[c]
            if x in tried:
                continue
            tried.add(x)
            px = p[x].item()
            if q is None:
                if r < px:
                    accepted = c
                    break
                zeroed = p.clone()
                zeroed[x] = 0.0
                p = _normalised(zeroed, p)
            else:
                qx = q[x].item()
                ratio = px / qx if qx > 0 else float(px > 0)
                if r < ratio:
                    accepted = c
                    break
                p = _normalised(torch.clamp(p - q, min=0.0), p)
                q_zeroed = q.clone()
                q_zeroed[x] = 0.0
                q = _normalised(q_zeroed, q_zeroed)
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=generator).item())
            return AcceptResult(nodes, [tree.tokens[i] for i in nodes], bonus)
        nodes.append(accepted)
        row = accepted + 1
