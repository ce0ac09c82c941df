"""The batched serial expansion shared by the EAGLE-family tree drafters, and their candidate pool.

``Expansion.layers`` runs EAGLE-2's beam (docs/ALGORITHMS.md §2.2): from the ``k`` root children
(``roots``), each drafter forward scores ``k`` children of each of the ``k`` frontier nodes
(global score = sum of drafter log-probs along the path) and the best ``k`` of those ``k * k``
become the next frontier. It yields one ``Layer`` per depth; what enters the pool is the
drafter's choice (EAGLE-2: every child; Gumiho: the survivors).

Everything stays on the drafter's device. Tree tokens' keys/values go into the scratch columns
of the batch's ``KVBatch`` after ``base`` (its longest committed length), and one additive mask
``[B, 1, k, base + steps * k]`` built per step gives every frontier node its row's committed
pairs, its ancestors and itself. The only host read is ``PoolBuilder.settled`` (one bool per
depth): it stops the expansion once no deeper node can enter any request's best ``budget``
nodes, which leaves the reranked trees unchanged (see ``settled``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from drafters.draft_kv import KVBatch, Slots
from drafters.eagle_model import EagleDrafter
from drafters.tree import DraftTree, rerank


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, n, ...]`` gathered at ``index [B, m]`` along dim 1 -> ``[B, m, ...]``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


@dataclass
class Pool:
    """Candidate nodes of one batched expansion: ``[B, P]`` each, parent-before-child."""

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor

    def trees(self, budgets: list[int]) -> list[DraftTree]:
        """One host transfer of the whole pool, then each request's rerank to its budget."""
        host = torch.stack([self.tokens.double(), self.parents.double(), self.scores.double()], 1).cpu().numpy()
        return [rerank(h[0], h[1], h[2], budget) for h, budget in zip(host, budgets)]


class PoolBuilder:
    """Appends ``[B, n]`` groups of candidate nodes; ``add`` returns their pool indices ``[B, n]``.

    ``budgets``: nodes the rerank keeps per request (for ``settled``); ``early_stop=False``: never settled
    (no host read: a CUDA graph runs every level).
    """

    def __init__(self, budgets: list[int], device: torch.device, early_stop: bool = True):
        self.tokens: list[torch.Tensor] = []
        self.parents: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.size = 0
        self.budgets = budgets
        self._budgets = torch.tensor(budgets, device=device) if early_stop else None   # [B]
        self.done = False

    def add(self, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.scores.append(scores)
        first, self.size = self.size, self.size + tokens.shape[1]
        return torch.arange(first, self.size, device=tokens.device).expand(tokens.shape[0], -1)

    def settled(self, frontier: torch.Tensor) -> bool:
        """True when nodes added from now on, all descending from nodes scored ``frontier [B, n]`` (so scoring
        at most its row maximum, the bound), cannot change any request's rerank: every request already has
        ``budget`` nodes scoring at least its bound.

        Scores never increase from parent to child (sums of log-probs), so the rerank keeps the top
        ``budget`` nodes by (score, then lower pool index); a later node has a higher index and a score
        at most the bound, so it ranks after all of them. Once true it stays true.
        """
        if self._budgets is not None and not self.done and max(self.budgets) <= self.size:
            top = torch.cat(self.scores, 1).topk(max(self.budgets), dim=1).values       # [B, b_max] descending
            kth = top.gather(1, (self._budgets - 1).clamp(min=0)[:, None])[:, 0]        # [B]
            self.done = bool(((kth >= frontier.amax(-1)) | (self._budgets == 0)).all())
        return self.done

    def build(self) -> Pool:
        return Pool(torch.cat(self.tokens, 1), torch.cat(self.parents, 1), torch.cat(self.scores, 1))


@dataclass
class Frontier:
    """``k`` nodes per request that the next drafter forward expands."""

    tokens: torch.Tensor          # [B, k] target token ids
    feats: torch.Tensor           # [B, k, H] drafter output that predicted each token
    scores: torch.Tensor          # [B, k] cumulative log-prob

    def select(self, slot: torch.Tensor) -> Frontier:
        """The nodes at ``slot [B, m]``."""
        return Frontier(self.tokens.gather(1, slot), gather_rows(self.feats, slot), self.scores.gather(1, slot))


@dataclass
class Layer:
    """One depth: every frontier node's ``k`` best children and the ``k`` survivors among them."""

    parent: Frontier              # the expanded frontier
    out: torch.Tensor             # [B, k, H] drafter output at each frontier node
    children: torch.Tensor        # [B, k * k] target ids; child c hangs below frontier node c // k
    scores: torch.Tensor          # [B, k * k] cumulative log-prob
    best: torch.Tensor            # [B, k] survivors' scores, descending
    sel: torch.Tensor             # [B, k] survivors' indices into ``children``

    @cached_property
    def slot(self) -> torch.Tensor:
        """``[B, k]`` the frontier node each survivor hangs below."""
        return self.sel // self.parent.tokens.shape[1]

    @cached_property
    def survivors(self) -> Frontier:
        """The next frontier: the survivors, each with the drafter output of its parent."""
        return Frontier(self.children.gather(1, self.sel), gather_rows(self.out, self.slot), self.best)


@dataclass
class DraftContext:
    """A drafting batch after its context pass."""

    kv: KVBatch
    lengths: torch.Tensor         # [B] committed pairs per row
    base: int                     # first scratch column: the longest committed length
    last: torch.Tensor            # [B, H] drafter output at each row's last committed pair


class Expansion:
    """``steps`` serial depths for one ``DraftContext`` with frontier width ``k``.

    The phases are methods (``forward``, ``head``, ``top``) so a profiler can wrap them.
    """

    def __init__(self, model: EagleDrafter, ctx: DraftContext, k: int, steps: int):
        self.model, self.ctx, self.k, self.steps = model, ctx, k, steps
        batch, base = ctx.lengths.shape[0], ctx.base
        dtype, device = ctx.last.dtype, ctx.last.device
        self.mask = torch.full((batch, 1, k, base + steps * k), float("-inf"), dtype=dtype, device=device)
        committed = torch.arange(base, device=device)[None, :] < ctx.lengths[:, None]         # [B, base]
        self.mask[:, :, :, :base].masked_fill_(committed[:, None, None, :], 0.0)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Drafter LM head: ``[..., H]`` -> logits ``[..., V']``."""
        return self.model.logits(hidden)

    def top(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and head indices of the ``k`` best tokens: ``[..., V']`` -> ``[..., k]`` each."""
        return logits.float().log_softmax(-1).topk(self.k, dim=-1)

    def roots(self, pool: PoolBuilder) -> tuple[Frontier, torch.Tensor]:
        """Depth 1: the ``k`` best children of each root, from the last committed pair's output, added to ``pool``
        (every drafter keeps them all). Returns them and their pool indices ``[B, k]``."""
        scores, idx = self.top(self.head(self.ctx.last))                              # [B, k]
        feats = self.ctx.last.unsqueeze(1).expand(-1, self.k, -1)                     # [B, k, H]
        frontier = Frontier(self.model.to_target_ids(idx), feats, scores)
        return frontier, pool.add(frontier.tokens, torch.full_like(frontier.tokens, -1), scores)

    def forward(self, frontier: Frontier, depth: int) -> torch.Tensor:
        """Drafter forward on the frontier at serial depth ``depth`` (0-based) -> ``[B, k, H]``."""
        col = self.ctx.base + depth * self.k
        positions = (self.ctx.lengths + depth)[:, None].expand(-1, self.k)            # [B, k]
        slots = Slots(self.ctx.kv, self.model.kv_heads, col, col + self.k)
        return self.model.step(frontier.tokens, frontier.feats, positions, slots, self.mask[..., :col + self.k])

    def layers(self, frontier: Frontier, pool: PoolBuilder) -> Iterator[Layer]:
        """Expand ``frontier`` depth by depth until ``steps`` or until ``pool`` is settled (checked before each
        forward against the frontier's best score; the caller adds each layer's nodes before resuming)."""
        base, k = self.ctx.base, self.k
        for depth in range(self.steps):
            if pool.settled(frontier.scores):
                return
            col = base + depth * k
            self.mask[..., col:col + k].diagonal(dim1=-2, dim2=-1).fill_(0.0)        # each node sees itself
            out = self.forward(frontier, depth)                                       # [B, k, H]
            child_lp, child_idx = self.top(self.head(out))                            # [B, k, k]
            scores = (child_lp + frontier.scores[:, :, None]).flatten(1)              # [B, k * k]
            best, sel = scores.topk(k, dim=-1)                                        # [B, k]
            layer = Layer(frontier, out, self.model.to_target_ids(child_idx).flatten(1), scores, best, sel)
            yield layer
            frontier = layer.survivors
            if depth + 1 < self.steps:                                                # ancestors: the parent's row
                history = self.mask[..., base:col + k]
                history.copy_(history.gather(2, layer.slot[:, None, :, None].expand_as(history)))
