"""Medusa heads training recipe (Medusa ``medusa/train/train_legacy.py``), run by ``loop.train_drafter``.

From the target's feature ``f_t`` (window position t), head i is trained with cross-entropy on the
token ``x_{t+2+i}`` (``tokens[t + 1 + i]``; the target's own LM head covers ``x_{t+1}``), over positions
where both ``x_{t+1}`` and that token are assistant tokens; the head losses are summed with weight
``decay ** i`` (1.0: Medusa-1's plain sum). The data is the target's own (mostly greedy) answers,
so the labels are the target's tokens. Features get no noise (Medusa adds none). With a truncated
head (``head_vocab`` K) labels outside the K tokens are left out of the loss but count as misses.

After training, ``finish`` measures on the held-out shards how often head i's rank-r candidate is
the target's greedy token (``rank_accuracy``), writes the static tree those accuracies give
(``static_tree.json``, Medusa's simulation) and returns the per-head top-1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from drafters.medusa_model import MedusaHeads, MedusaHeadsSpec, load_medusa, read_medusa, save_medusa
from drafters.medusa_tree import STATIC_TREE_FILE, save_static_tree, static_paths
from drafters.train.features import split_shards
from drafters.train.loop import Recipe, ShardRecords, TrainConfig, collate, train_drafter


class MedusaRecipe(Recipe):
    """``num_heads`` heads of ``num_layers`` blocks; a frozen target LM head or trained per-head ones."""

    method = "medusa"

    def __init__(self, num_heads: int = 4, num_layers: int = 1, trained_head: bool = False, decay: float = 0.8,
                 save_dtype: torch.dtype = torch.float16):
        super().__init__(save_dtype)
        self.spec = (num_heads, num_layers, trained_head)
        self.decay = decay
        self.lookup: torch.Tensor | None = None      # [V] target id -> head index (-1: outside a truncated head)

    def build(self, target_config: dict[str, Any], embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
              head_ids: torch.Tensor | None) -> MedusaHeads:
        vocab, hidden = lm_head_weight.shape
        return MedusaHeads(MedusaHeadsSpec(hidden, vocab, *self.spec), lm_head_weight, head_ids)

    def read_init(self, folder: str) -> dict[str, torch.Tensor]:
        return read_medusa(folder)[1]

    def load_init(self, heads: MedusaHeads, state: dict[str, torch.Tensor]) -> None:
        """Medusa-named weights (ours or FasterDecoding's) into heads of the same shape, in fp32."""
        heads.load_medusa_state({k: v.float() for k, v in state.items()})

    def head_index(self, heads: MedusaHeads, labels: torch.Tensor) -> torch.Tensor:
        """Target ids -> indices into the heads' vocabulary (-1 where a truncated head lacks the token)."""
        if heads.head_token_ids is None:
            return labels
        if self.lookup is None or self.lookup.device != labels.device:
            self.lookup = torch.full((heads.config.vocab_size,), -1, dtype=torch.long, device=labels.device)
            self.lookup[heads.head_token_ids] = torch.arange(len(heads.head_token_ids), device=labels.device)
        return self.lookup[labels]

    def losses(self, heads: MedusaHeads, batch: dict[str, torch.Tensor], cfg: TrainConfig, noise: float,
               epoch: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tokens, mask = batch["tokens"], batch["mask"].bool()                          # [B, T], [B, T]
        length = tokens.shape[1]
        feats = heads(batch["features"])                                              # [B, T, D, H]
        drafted = torch.zeros_like(tokens)                                            # [B, T] head 0's argmax
        loss, metrics = feats.new_zeros(()), {}
        for i in range(heads.num_heads):
            n = length - 1 - i                                # positions t whose label x_{t+2+i} is in the window
            if n <= 0:
                break
            rows = mask.clone() if i == 0 else torch.zeros_like(mask)                 # head 0 drafts every row
            valid = mask[:, :n] & mask[:, 1 + i:]                                     # [B, n]
            rows[:, :n] |= valid
            logits = heads.head_logits(feats[:, :, i][rows], i)                       # [R, K]
            labels = torch.full_like(tokens, -1)
            labels[:, :n] = torch.where(valid, self.head_index(heads, tokens[:, 1 + i:]), -1)
            labels = labels[rows]                                                     # [R]
            scored = labels >= 0
            ce = F.cross_entropy(logits[scored].float(), labels[scored]) if scored.any() else logits.sum() * 0
            loss = loss + self.decay ** i * ce
            picks = logits.detach().argmax(-1)                                        # [R]
            if i == 0:
                drafted[rows] = picks
            hits = (picks == labels) & scored
            denom = valid.sum().clamp(min=1)
            metrics[f"ce_h{i}"], metrics[f"acc_h{i}"] = ce.detach(), hits.sum() / denom
        return {"loss": loss, "acc": metrics.get("acc_h0", loss.new_zeros(())), **metrics,
                "tokens": mask.sum()}, drafted

    def top1_by_depth(self, heads: MedusaHeads, batch: dict[str, torch.Tensor], full_head: torch.Tensor,
                      depth: int) -> list[tuple[float, float]]:
        """Depth d = head d - 1's argmax against the target's greedy token d + 1 positions after t."""
        greedy = F.linear(batch["targets"], full_head).argmax(-1)                     # [B, T] x_{t+2}
        feats = heads(batch["features"])                                              # [B, T, D, H]
        mask, length, out = batch["mask"].bool(), greedy.shape[1], []
        for i in range(min(depth, heads.num_heads)):
            n = length - i
            valid = mask[:, :n] & mask[:, i:]
            picks = heads.to_target_ids(heads.head_logits(feats[:, :n, i][valid], i).argmax(-1))
            out.append((float((picks == greedy[:, i:][valid]).sum()), float(valid.sum())))
        return out

    def save(self, out: Path, heads: MedusaHeads, extra: dict[str, Any]) -> None:
        save_medusa(out, heads, extra, self.save_dtype)


@torch.no_grad()
def rank_accuracy(heads: MedusaHeads, records: ShardRecords, full_head: torch.Tensor, ranks: int, max_len: int,
                  batch_size: int = 8) -> np.ndarray:
    """``[D, ranks]``: share of held-out positions where head i's rank-r candidate is the target's greedy
    token ``i + 2`` positions on (positions where both ends are assistant tokens)."""
    heads.eval()
    device = full_head.device
    hits = torch.zeros(heads.num_heads, ranks, dtype=torch.float64)
    total = torch.zeros(heads.num_heads, dtype=torch.float64)
    rng = random.Random(0)
    order = sorted(range(len(records)), key=records.length)
    for b in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate([records.window(i, max_len, rng) for i in order[b:b + batch_size]]).items()}
        mask = batch["mask"].bool()
        greedy = F.linear(batch["targets"][mask], full_head).argmax(-1)               # [N]
        labels = torch.full(mask.shape, -1, dtype=torch.long, device=device)
        labels[mask] = greedy                                                         # [B, T] x_{t+2}
        feats = heads(batch["features"])                                              # [B, T, D, H]
        for i in range(heads.num_heads):
            n = mask.shape[1] - i
            valid = mask[:, :n] & mask[:, i:]
            logits = heads.head_logits(feats[:, :n, i][valid], i)                     # [N_i, K]
            top = heads.to_target_ids(logits.topk(min(ranks, logits.shape[-1]), -1).indices)  # [N_i, r]
            hits[i, :top.shape[1]] += (top == labels[:, i:][valid][:, None]).sum(0).double().cpu()
            total[i] += float(valid.sum())
    heads.train()
    return (hits / total.clamp(min=1)[:, None]).numpy()


def finish(heads: MedusaHeads, cfg: TrainConfig, lm_head_weight: torch.Tensor, ranks: int = 10,
           tree_size: int = 64) -> dict[str, Any]:
    """Held-out rank accuracies of the trained heads and the static tree they give (``static_tree.json``)."""
    held = split_shards(cfg.work, cfg.val_shards)[1]
    if not held:
        return {}
    accuracy = rank_accuracy(heads, ShardRecords(held), lm_head_weight, ranks, cfg.max_len, cfg.batch_size)
    top1 = [round(float(a), 4) for a in accuracy[:, 0]]
    save_static_tree(Path(cfg.out) / STATIC_TREE_FILE, static_paths(accuracy, tree_size), accuracy,
                     {"source": "held-out rank accuracy of these heads (Medusa's simulation)",
                      "held_out_shards": [p.name for p in held], "top1_by_head": top1})
    return {"held_out_top1_by_head": top1, "held_out_top10_by_head": [round(float(a), 4) for a in accuracy.sum(1)]}


def train_medusa(cfg: TrainConfig, target_config: dict[str, Any], embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor, recipe: MedusaRecipe) -> dict[str, Any]:
    """Train (or resume) Medusa heads for the target; writes the checkpoint, logs and static tree under
    ``cfg.out``."""
    summary = train_drafter(recipe, cfg, target_config, embed_weight, lm_head_weight)
    heads = load_medusa(cfg.out, lm_head_weight.float().to(cfg.device)).float().train()
    measured = finish(heads, cfg, lm_head_weight.float().to(cfg.device))
    log_file = Path(cfg.out) / "train_log.json"
    log_file.write_text(json.dumps({**json.loads(log_file.read_text()), **measured}, indent=2))
    return {**summary, **measured}


def train_medusa_from_args(args: Any, target_config: dict[str, Any], embed: torch.Tensor,
                           lm_head: torch.Tensor) -> dict[str, Any]:
    """``treespec train-drafter --method medusa``: the shared settings plus the ``medusa`` flag group."""
    from drafters.train.cli import train_config

    recipe = MedusaRecipe(args.medusa_heads, args.medusa_layers, args.medusa_head == "trained", args.medusa_decay,
                          getattr(torch, args.save_dtype))
    return train_medusa(train_config(args), target_config, embed, lm_head, recipe)
