"""Gumiho hybrid drafter: serial transformer steps, then parallel MLP heads (arXiv 2503.10135).

Per request and step (the context pass and drafter KV are EAGLE's, ``EagleTreeDrafter``):

1. depth 1: the ``top_k`` children of the root, from the serial head's last context output;
2. ``depth - mlp_depths`` serial steps (at least 1): each expands the ``k`` beams into ``k``
   children each and keeps the best ``k`` by cumulative log-prob; only those survivors enter
   the pool (EAGLE-2 keeps all ``k * k``);
3. the parallel MLP heads on the ``k`` beams give a distribution per beam and later depth. For
   each MLP depth j every current node takes the top ``mlp_top_k`` tokens of its *originating
   beam's* head-j row (the heads are not autoregressive), and the best ``pruning`` by cumulative
   score are kept globally;
4. rerank of the whole pool (``k + k * serial_steps + mlp_depths * pruning`` nodes at most) to
   the budget.

The serial steps are ``drafters.expansion``'s; as in EAGLE, drafting stops (before a serial
forward or an MLP head) once no deeper node could make any request's budget.

The MLP input of beam b pairs b's own parent token with b's token (the faithful pairing; the
released code pairs candidate b of depth 1 in rank order with beam b). Gumiho's Full Tree
Attention (padding short paths with another branch's nodes) is not lossless and is not offered.
Tree depth = ``depth + 1`` = serial tokens + MLP depths, as in Gumiho (``depth 6``, ``mlp_num 5``:
2 serial tokens, 5 MLP tokens, draft depth 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drafters.eagle import EagleTreeDrafter
from drafters.expansion import DraftContext, Expansion, Frontier, Pool, PoolBuilder
from drafters.gumiho_model import GumihoDrafter


@dataclass
class Beam:
    """The ``k`` beams after the serial steps: the MLP heads read each beam's last two serial nodes."""

    prev: Frontier                # each beam's parent (a root child's parent: the root, with its own feature)
    last: Frontier                # the beam's own node
    nodes: torch.Tensor           # [B, k] pool index of ``last``


class GumihoTreeDrafter(EagleTreeDrafter):
    name = "gumiho"
    default_depth = 6

    def __init__(self, model: GumihoDrafter, total_tokens: int = 16, depth: int | None = None, top_k: int = 4,
                 mlp_top_k: int = 8, pruning: int = 8):
        super().__init__(model, total_tokens, depth, top_k)
        self.mlp_top_k, self.pruning = mlp_top_k, pruning

    def split(self, depth: int) -> tuple[int, int]:
        """``(serial steps, MLP depths)`` for an expansion depth: at least one serial step (the MLPs
        read two serial tokens), at most ``mlp_num`` MLP depths."""
        mlp_depths = min(self.model.config.mlp_num, depth - 1)
        return depth - mlp_depths, mlp_depths

    def expand(self, ctx: DraftContext, k: int, depth: int, pool: PoolBuilder) -> Pool:
        """Serial steps where only the ``k`` survivors of each depth enter the pool, then the MLP stage."""
        steps, mlp_depths = self.split(depth)
        expansion = Expansion(self.model, ctx, k, steps)
        roots, nodes = expansion.roots(pool)
        beam = Beam(roots, roots, nodes)
        for layer in expansion.layers(roots, pool):
            kept = layer.survivors
            beam = Beam(layer.parent.select(layer.slot), kept,
                        pool.add(kept.tokens, beam.nodes.gather(1, layer.slot), kept.scores))
        if mlp_depths:
            self.parallel(beam, mlp_depths, pool)
        return pool.build()

    def parallel(self, beam: Beam, mlp_depths: int, pool: PoolBuilder) -> None:
        """MLP stage: ``mlp_depths`` levels of per-beam top-``mlp_top_k`` with global pruning. Head j (its MLP and
        the LM head over the ``k`` beams) runs only when the pool is not settled before depth j."""
        if pool.settled(beam.last.scores):
            return
        model = self.model
        mlp_in = model.mlp_input(beam.prev.tokens, beam.prev.feats, beam.last.tokens, beam.last.feats)  # [B, k, 2H]
        batch, k = beam.last.tokens.shape
        rows = torch.arange(k, device=mlp_in.device).expand(batch, k)   # originating beam of each current node
        scores, nodes = beam.last.scores, beam.nodes                    # [B, n]
        for j in range(mlp_depths):
            if j and pool.settled(scores):
                return
            logp = model.logits(model.mlp.head(j, mlp_in)).float().log_softmax(-1)            # [B, k, V']
            head_j = logp.gather(1, rows[:, :, None].expand(-1, -1, logp.shape[-1]))         # [B, n, V']
            top_lp, top_idx = head_j.topk(min(self.mlp_top_k, head_j.shape[-1]), dim=-1)    # [B, n, t]
            width = top_lp.shape[-1]
            cumulative = (top_lp + scores[:, :, None]).flatten(1)                           # [B, n*t]
            scores, sel = cumulative.topk(min(self.pruning, cumulative.shape[1]), dim=-1)   # [B, p]
            parent = sel // width
            tokens = model.to_target_ids(top_idx.flatten(1).gather(1, sel))
            nodes = pool.add(tokens, nodes.gather(1, parent), scores)
            rows = rows.gather(1, parent)
