"""Verification of a draft tree against the target model's outputs (greedy and lossless sampling).

Row layout of every target/draft tensor follows :meth:`DraftTree.ancestor_mask`: row 0 is the
target's prediction after the root (the last committed token) and row ``i + 1`` its prediction
after draft node ``i``.

Verification reads the device once per tree: the few numbers the walk needs (and, for sampling
on an accelerator, every random draw it could use) are computed on the device first, moved to
the host in one transfer, and the walk over the tree runs on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from drafters.tree import DraftTree
from server.worker.sampling import exponential_noise, sample_rows

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


def _distinct_children(tree: DraftTree) -> list[list[int]]:
    """Children of every row in ascending index order, without a child whose token an earlier
    sibling already has (it can never be accepted). Entry 0 is the root, entry ``i + 1`` node ``i``.
    """
    kids: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    seen: list[set[int]] = [set() for _ in range(len(tree) + 1)]
    for i, (p, x) in enumerate(zip(tree.parents, tree.tokens)):
        if x not in seen[p + 1]:
            seen[p + 1].add(x)
            kids[p + 1].append(i)
    return kids


def _check_rows(name: str, t: torch.Tensor, tree: DraftTree, ndim: int) -> None:
    """Raise ``ValueError`` unless ``t`` has ``ndim`` dims and one row per tree row (``n + 1``)."""
    if t.dim() != ndim or t.shape[0] != len(tree) + 1:
        raise ValueError(f"{name} must have {ndim} dims and {len(tree) + 1} rows, got {tuple(t.shape)}")


def _check_mass(row: int, mass: float) -> None:
    """Raise ``ValueError`` when the walk ends at a row that is not a distribution (no mass, NaN, inf)."""
    if not (math.isfinite(mass) and mass > 0.0):
        raise ValueError(f"target row {row} has no usable probability mass ({mass})")


def _result(tree: DraftTree, nodes: list[int], bonus: int) -> AcceptResult:
    """The :class:`AcceptResult` of accepting ``nodes`` (root child first) and emitting ``bonus``."""
    return AcceptResult(nodes, [tree.tokens[i] for i in nodes], bonus)


def greedy_accept(tree: DraftTree, target_argmax: torch.Tensor) -> AcceptResult:
    """Accept the longest root-to-node path whose tokens all equal the target's argmax.

    Args:
        tree: the draft tree that was verified.
        target_argmax: target argmax token after the root (row 0) and after each node
            (row ``i + 1``).  # [n+1] int64

    At each accepted node the first child (lowest index) whose token equals that node's argmax
    row is taken; distinct siblings make this the only match. The bonus is the argmax row of
    the deepest accepted node, or of the root when nothing is accepted. One host transfer.
    """
    _check_rows("target_argmax", target_argmax, tree, 1)
    best = target_argmax.tolist()  # [n+1]
    kids = _distinct_children(tree)
    nodes: list[int] = []
    row = 0
    while True:
        nxt = next((c for c in kids[row] if tree.tokens[c] == best[row]), None)
        if nxt is None:
            return _result(tree, nodes, int(best[row]))
        nodes.append(nxt)
        row = nxt + 1


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
        generator: the only source of randomness. Pass one on ``target_probs.device``: the rows
            are moved to ``generator.device`` otherwise (a full copy).
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

    Raises ``ValueError`` when the walk ends at a row with no finite positive mass.
    """
    _check_rows("target_probs", target_probs, tree, 2)
    probs = target_probs.to(generator.device)  # [n+1, V]
    if draft_probs is None:
        return _accept_topk(tree, probs, generator, presample=probs.device.type != "cpu")
    _check_rows("draft_probs", draft_probs, tree, 2)
    if draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"draft_probs {tuple(draft_probs.shape)} != target_probs {tuple(target_probs.shape)}"
        )
    return _accept_drafted(tree, probs, draft_probs.to(generator.device), generator)


def _index_tensor(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Host ints -> int64 tensor on ``device``, copied without waiting for the device."""
    pinned = device.type == "cuda"
    return torch.tensor(rows, dtype=torch.long, pin_memory=pinned).to(device, non_blocking=pinned)


def _accept_topk(
    tree: DraftTree, probs: torch.Tensor, generator: torch.Generator, presample: bool
) -> AcceptResult:
    """``q = 1`` verification of ``probs [n+1, V]`` with one device-to-host transfer.

    After rejecting the distinct child tokens ``x_1..x_{j-1}`` of a row, the renormalised
    residual gives ``x_j`` the acceptance probability ``p[x_j] / D_j``, where ``D_j`` is the
    row's mass outside ``x_1..x_{j-1}``: the mass ``R`` outside all of the row's child tokens
    plus ``p[x_j] + ... + p[x_k]`` (sums of non-negative terms, so no cancellation). The walk
    ends at a row only once all its children are rejected, so the bonus always comes from that
    row's full residual (``p`` with every child token zeroed), which does not depend on the
    walk: with ``presample`` it is drawn for every row on the device before the single transfer,
    otherwise (cheaper on the CPU, where a transfer costs nothing) only for the final row.
    The residual never runs out of mass: when ``R == 0`` the last child with mass has
    ``D_j == p[x_j]`` and is accepted with probability exactly 1.
    """
    n, device = len(tree), probs.device
    kids = _distinct_children(tree)
    idx = _index_tensor([[p + 1 for p in tree.parents], list(tree.tokens)], device)  # [2, n]
    parts = [
        probs[idx[0], idx[1]].to(torch.float64),  # [n] p of every node's token in its parent row
        torch.rand(n, generator=generator, dtype=torch.float64, device=device),  # [n] one per node
    ]
    if presample:
        residual = probs.index_put((idx[0], idx[1]), probs.new_zeros(()))  # [n+1, V]
        parts.append(residual.sum(-1, dtype=torch.float64))  # [n+1] R of every row
        parts.append(sample_rows(residual, generator).to(torch.float64))  # [n+1] bonus of every row
    host = torch.cat(parts).tolist()  # the one transfer
    child_p, uniform = host[:n], host[n : 2 * n]
    if presample:
        rest, bonus = host[2 * n : 3 * n + 1], host[3 * n + 1 :]
        nodes, row = _walk_topk(kids, child_p, uniform, rest.__getitem__)
        return _result(tree, nodes, int(bonus[row]))

    residuals: dict[int, torch.Tensor] = {}

    def row_rest(r: int) -> float:
        zeroed = torch.tensor([tree.tokens[c] for c in kids[r]], dtype=torch.long, device=device)
        residuals[r] = probs[r].index_fill(0, zeroed, 0.0)  # [V]
        return residuals[r].sum(dtype=torch.float64).item()

    nodes, row = _walk_topk(kids, child_p, uniform, row_rest)
    return _result(tree, nodes, int(sample_rows(residuals[row][None], generator)[0]))


def _walk_topk(
    kids: list[list[int]], child_p: list[float], uniform: list[float], rest: Callable[[int], float]
) -> tuple[list[int], int]:
    """Host walk for ``q = 1``: the accepted nodes and the row the walk ends at.

    ``child_p[i]`` is node ``i``'s token's (unnormalised) probability in its parent's row,
    ``uniform[i]`` its acceptance draw, and ``rest(r)`` row ``r``'s mass outside all its
    children's tokens (asked once per visited row).
    """
    nodes: list[int] = []
    row = 0
    while True:
        tries = kids[row]
        mass = rest(row)
        left = []  # mass of the residual when each child is tried, D_j
        for c in reversed(tries):
            mass += child_p[c]
            left.append(mass)
        left.reverse()
        nxt = next((c for c, d in zip(tries, left) if uniform[c] < (child_p[c] / d if d > 0 else 0.0)), None)
        if nxt is None:
            _check_mass(row, mass)
            return nodes, row
        nodes.append(nxt)
        row = nxt + 1


def _normalised(v: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``v / v.sum()``, or ``fallback`` when ``v`` carries no mass (numerically degenerate case)."""
    total = v.sum()
    return v / total if total > 0 else fallback


def _accept_drafted(
    tree: DraftTree, probs: torch.Tensor, q_probs: torch.Tensor, generator: torch.Generator
) -> AcceptResult:
    """Verification of children sampled from ``q_probs [n+1, V]``, walked on a host copy.

    The residual after a rejection depends on whole rows, so both tensors travel to the host,
    with one acceptance draw per node and exponential noise for every row's bonus (an
    exponential race on whichever residual the walk ends with), all in one transfer.
    """
    n, device = len(tree), probs.device
    shape = probs.shape
    noise = exponential_noise(torch.empty(shape, dtype=torch.float64, device=device), generator)  # [n+1, V]
    uniform = torch.rand(n, generator=generator, dtype=torch.float64, device=device)  # [n]
    flat = [t.to(torch.float64).flatten() for t in (probs, q_probs, noise)] + [uniform]
    host = torch.cat(flat).cpu().numpy()  # the one transfer
    p_all, q_all, e_all = host[: 3 * probs.numel()].reshape(3, *shape)  # [n+1, V] each
    u = host[3 * probs.numel() :]  # [n]
    kids = _distinct_children(tree)
    nodes: list[int] = []
    row = 0
    while True:
        p = _normalised(p_all[row], p_all[row])  # [V]
        q = _normalised(q_all[row], q_all[row])  # [V]
        accepted = None
        for c in kids[row]:
            x = tree.tokens[c]
            ratio = p[x] / q[x] if q[x] > 0 else float(p[x] > 0)
            if u[c] < ratio:
                accepted = c
                break
            p = _normalised(np.maximum(p - q, 0.0), p)
            q_zeroed = q.copy()
            q_zeroed[x] = 0.0
            q = _normalised(q_zeroed, q_zeroed)
        if accepted is None:
            _check_mass(row, float(p.sum()))
            return _result(tree, nodes, int(np.argmax(p / e_all[row])))
        nodes.append(accepted)
        row = accepted + 1
