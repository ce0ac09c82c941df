"""Gumiho drafter training recipe (Gumiho ``gumiho/train/main_deepspeed.py``), run by ``loop.train_drafter``.

The serial head is trained exactly as EAGLE (``(x_{t+1}, f_t + noise)`` -> ``f_{t+1}``, SmoothL1 +
0.1 CE). MLP head i, at window position t, reads
``cat(fc(embed(x_{t+2}), ŝ_t), fc(embed(x_{t+3}), ŝ_{t+1}))`` (``ŝ`` = serial outputs) and regresses
``f_{t+3+i}``; its SmoothL1 + 0.1 CE terms are weighted ``mlp_decay ** (i + 1) / 9`` (Gumiho's
``mlp_loss_decay_coefficient`` 0.8 and ``mlp_loss_weight`` 9). As in Gumiho's ``train.sh`` (``mlp_p_w`` 100), the MLP CE
terms start after ``mlp_ce_after_epochs`` (2) epochs: before that the MLP heads learn features only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from drafters.gumiho_model import GumihoConfig, GumihoDrafter, save_gumiho_checkpoint
from drafters.train.eagle import noisy
from drafters.train.loop import Recipe, TrainConfig, feature_losses, train_drafter
from drafters.train.unroll import shift, unrolled, unrolled_losses

MLP_LOSS_WEIGHT = 9.0


class GumihoRecipe(Recipe):
    """Gumiho drafters with ``mlp_num`` heads of ``mlp_res_blocks`` residual blocks."""

    method = "gumiho"

    def __init__(self, mlp_num: int, mlp_res_blocks: int, save_dtype: torch.dtype = torch.float32):
        super().__init__(save_dtype)
        self.mlp_num, self.mlp_res_blocks = mlp_num, mlp_res_blocks

    def build(self, target_config: dict[str, Any], embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
              head_ids: torch.Tensor | None) -> GumihoDrafter:
        cfg = GumihoConfig.from_dict(target_config, num_hidden_layers=2, bias=True, mlp_num=self.mlp_num,
                                     mlp_res_blocks=self.mlp_res_blocks)
        return GumihoDrafter(cfg, embed_weight, lm_head_weight, head_ids)

    def losses(self, drafter: GumihoDrafter, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               noise: float, epoch: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]   # [B, T], [B, T, H], [B, T]
        pred, _ = drafter(tokens, noisy(batch["features"], noise), batch["positions"])  # [B, T, H]
        serial = feature_losses(drafter, pred, targets, mask)
        drafted, target_logits = serial.pop("drafted"), serial.pop("target_logits")  # [B, T], [B, T, K]
        loss = cfg.v_weight * serial["vloss"] + cfg.p_weight * serial["ploss"]
        metrics = dict(serial)
        with_ce = epoch >= cfg.mlp_ce_after_epochs
        length = tokens.shape[1]
        if length >= 3:
            heads = drafter.parallel(tokens[:, 1:-1], pred[:, :-2], tokens[:, 2:], pred[:, 1:-1])  # [B, T-2, M, H]
            for i in range(heads.shape[2]):
                n = length - 2 - i                   # positions t whose target f_{t+3+i} is in the window
                if n <= 0:
                    break
                later = slice(2 + i, 2 + i + n)
                terms = feature_losses(drafter, heads[:, :n, i], targets[:, later], mask[:, :n] * mask[:, later],
                                       target_logits[:, later], with_ce)
                head_loss = cfg.v_weight * terms["vloss"] + (cfg.p_weight * terms["ploss"] if with_ce else 0.0)
                loss = loss + cfg.mlp_decay ** (i + 1) / MLP_LOSS_WEIGHT * head_loss
                metrics[f"vloss_mlp{i}"] = terms["vloss"]
                if with_ce:
                    metrics[f"acc_mlp{i}"] = terms["acc"]
        return {"loss": loss, **metrics, "tokens": mask.sum()}, drafted

    def top1_by_depth(self, drafter: GumihoDrafter, batch: dict[str, torch.Tensor], full_head: torch.Tensor,
                      depth: int) -> list[tuple[float, float]]:
        """As at inference: depths 1-2 from the serial head (the second on its own feature), later depths
        from the MLP heads reading those two serial steps."""
        tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]
        serial = unrolled(drafter, tokens, batch["features"], batch["positions"], 2)   # 2 x [B, T, H]
        steps = unrolled_losses(drafter, serial, targets, mask, full_head)
        heads = drafter.parallel(shift(tokens, 1), serial[0], shift(tokens, 2), serial[1])  # [B, T, M, H]
        for i in range(min(heads.shape[2], depth - 2)):
            steps += unrolled_losses(drafter, [heads[:, :, i]], shift(targets, 2 + i), shift(mask, 2 + i),
                                     full_head)
        return [(float(t["acc_full"] * t["tokens"]), float(t["tokens"])) for t in steps[:depth]]

    def save(self, out: Path, drafter: GumihoDrafter, extra: dict[str, Any]) -> None:
        save_gumiho_checkpoint(out, drafter, extra, dtype=self.save_dtype)


def train_gumiho(cfg: TrainConfig, target_config: dict[str, Any], embed_weight: torch.Tensor,
                 lm_head_weight: torch.Tensor, save_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train (or resume) a Gumiho drafter for the target; writes the checkpoint and logs under ``cfg.out``."""
    recipe = GumihoRecipe(cfg.mlp_num, cfg.mlp_res_blocks, save_dtype)
    return train_drafter(recipe, cfg, target_config, embed_weight, lm_head_weight)
