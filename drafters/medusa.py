"""Medusa drafter: parallel heads over the target's last feature, MEDUSA+ dynamic or static trees.

Per request the drafter keeps one vector: the target's post-norm feature ``f_t`` of the last
committed position (the one whose LM-head argmax is the tree root), from ``on_accept``. Each step
the heads run once on the stacked features of every drafted request (``[B, H]`` -> ``[B, D, K]``
logits), their top candidates cross to the host in one transfer, and each request's tree is chosen
there (``drafters.medusa_tree``): the ``budget`` best index tuples by the product of renormalised
marginals (dynamic), or the first ``budget`` paths of a static tree. The heads do not see the draft
tokens, so drafting is one small forward per step whatever the tree. Drafts are deterministic top-k:
verification uses q = 1 (lossless, greedy and sampled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.medusa_config import MedusaConfig
from drafters.medusa_model import MedusaHeads, load_medusa
from drafters.medusa_tree import STATIC_TREE_FILE, Path_, dynamic_tree, load_static_tree, static_tree
from drafters.tree import DraftTree


class MedusaDrafter(Drafter):
    name = "medusa"

    def __init__(self, heads: MedusaHeads, total_tokens: int = 16, config: MedusaConfig | None = None,
                 paths: list[Path_] | None = None):
        self.heads = heads
        self.max_tree_tokens = total_tokens
        self.config = config or MedusaConfig()
        self.num_heads = min(self.config.num_heads or heads.num_heads, heads.num_heads)
        self.paths = paths if self.config.tree == "static" else None
        if self.config.tree == "static" and not paths:
            raise ValueError("the static Medusa tree needs index paths (medusa.static_tree)")
        ranks = max(max(p) for p in paths) + 1 if self.paths else 0
        self.width = max(self.config.top_k, ranks)          # candidates per head fetched each step
        self.features: dict[str, torch.Tensor] = {}         # request id -> [H] feature of the last committed position

    @classmethod
    def from_checkpoint(cls, folder: str | Path, lm_head: nn.Module | torch.Tensor, total_tokens: int,
                        config: MedusaConfig) -> MedusaDrafter:
        """Heads of ``folder`` on the target's LM head; the static tree from ``config.static_tree`` or the
        folder's ``static_tree.json``."""
        paths = None
        if config.tree == "static":
            paths = load_static_tree(config.static_tree or Path(folder) / STATIC_TREE_FILE)
        return cls(load_medusa(folder, lm_head), total_tokens, config, paths)

    def tree_shape(self) -> tuple[int, int]:
        return self.num_heads, self.config.top_k

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        for u in updates:
            self.features[u.request_id] = u.features[-1].clone()

    def release(self, request_id: str) -> None:
        self.features.pop(request_id, None)

    @torch.inference_mode()
    def candidates(self, request_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every head's top ``width`` logits (descending) and their target token ids for the requests, on the
        host: two ``[B, D, width]`` arrays, from one batched forward and one transfer."""
        hidden = torch.stack([self.features[r] for r in request_ids])                  # [B, H]
        logits = self.heads.logits(self.heads(hidden, self.num_heads)).float()          # [B, D, K]
        values, index = logits.topk(min(self.width, logits.shape[-1]), dim=-1)          # [B, D, w]
        host = torch.stack([values.double(), self.heads.to_target_ids(index).double()]).cpu().numpy()
        return host[0], host[1].astype(np.int64)

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        trees = [DraftTree.empty()] * len(requests)
        live = [i for i, r in enumerate(requests) if r.request_id in self.features and r.budget > 0]
        if not live:
            return trees
        logits, ids = self.candidates([requests[i].request_id for i in live])
        for b, i in enumerate(live):
            r = requests[i]
            budget = min(r.budget, self.max_tree_tokens)
            depth = min(r.params.draft_depth or self.num_heads, self.num_heads)
            if self.paths is not None:
                trees[i] = static_tree(self.paths, logits[b, :depth], ids[b, :depth], budget)
            else:
                k = min(r.params.draft_top_k or self.config.top_k, logits.shape[-1])
                trees[i] = dynamic_tree(logits[b, :depth, :k], ids[b, :depth, :k], budget)
        return trees

    def bench_report(self) -> dict:
        return {"tree": self.config.tree, "heads": self.num_heads, "top_k": self.config.top_k,
                "trained_head": self.heads.config.trained_head,
                "head_vocab": int(self.heads.head_weight.shape[0])}
