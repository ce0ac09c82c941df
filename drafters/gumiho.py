"""Gumiho hybrid drafter: serial transformer steps, then parallel MLP heads (arXiv 2503.10135).

Per request and step (the context pass and drafter KV are EAGLE's, ``EagleTreeDrafter``):

1. depth 1: the ``top_k`` children of the root, from the serial head's last context output;
2. ``depth - mlp_depths`` serial steps (at least 1): each expands the ``k`` beams into ``k``
   children each and keeps the best ``k`` by cumulative log-prob; only those survivors enter
   the pool (EAGLE-2 keeps all ``k * k``);
3. one call of the parallel MLP heads on the ``k`` beams gives a distribution per beam and later
   depth ``[B, k, mlp_depths, V]``. For each MLP depth j every current node takes the top
   ``mlp_top_k`` tokens of its *originating beam's* head-j row (the heads are not
   autoregressive), and the best ``pruning`` by cumulative score are kept globally;
4. rerank of the whole pool (``k + k * serial_steps + mlp_depths * pruning`` nodes) to the budget.

The MLP input of beam b pairs b's own parent token with b's token (the faithful pairing; the
released code pairs candidate b of depth 1 in rank order with beam b). Gumiho's Full Tree
Attention (padding short paths with another branch's nodes) is not lossless and is not offered.
Tree depth = ``depth + 1`` = serial tokens + MLP depths, as in Gumiho (``depth 6``, ``mlp_num 5``:
2 serial tokens, 5 MLP tokens, draft depth 7).
"""

from __future__ import annotations

import torch

from drafters.eagle import Beam, EagleTreeDrafter, Pool, PoolBuilder, _State
from drafters.gumiho_model import GumihoDrafter


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

    def expand(self, states: list[_State], k: int, depth: int) -> Pool:
        pool = PoolBuilder()
        steps, mlp_depths = self.split(depth)
        beam = self.serial(states, k, steps, pool, all_children=False)
        if mlp_depths:
            self.parallel(beam, mlp_depths, pool)
        return pool.build()

    def parallel(self, beam: Beam, mlp_depths: int, pool: PoolBuilder) -> None:
        """MLP stage: ``mlp_depths`` levels of per-beam top-``mlp_top_k`` with global pruning."""
        model = self.model
        hidden = model.parallel(beam.prev_tokens, beam.prev_feats, beam.tokens, beam.feats)  # [B, k, M, H]
        logp = model.logits(hidden[:, :, :mlp_depths]).float().log_softmax(-1)              # [B, k, m, V']
        batch, k = beam.tokens.shape
        rows = torch.arange(k).expand(batch, k)                 # originating beam of each current node
        scores, nodes = beam.scores, beam.nodes                 # [B, n]
        for j in range(mlp_depths):
            head_j = logp[:, :, j].gather(1, rows[:, :, None].expand(-1, -1, logp.shape[-1]))  # [B, n, V']
            top_lp, top_idx = head_j.topk(min(self.mlp_top_k, head_j.shape[-1]), dim=-1)    # [B, n, t]
            width = top_lp.shape[-1]
            cumulative = (top_lp + scores[:, :, None]).flatten(1)                           # [B, n*t]
            scores, sel = cumulative.topk(min(self.pruning, cumulative.shape[1]), dim=-1)   # [B, p]
            parent = sel // width
            tokens = model.to_target_ids(top_idx.flatten(1).gather(1, sel))
            nodes = pool.add(tokens, nodes.gather(1, parent), scores)
            rows = rows.gather(1, parent)
