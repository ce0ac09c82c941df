"""EAGLE-1/2 drafter training recipe (EAGLE ``eagle/train/main.py``), run by ``loop.train_drafter``.

Position t of a window feeds the drafter ``(x_{t+1}, f_t + noise)`` and asks for ``f_{t+1}``:
loss = SmoothL1(f̂_{t+1}, f_{t+1}) + 0.1 · CE(softmax(head(f_{t+1})), log_softmax(head(f̂_{t+1}))),
averaged over positions whose ``x_{t+1}`` is an assistant token (the drafts an inference step
makes). With ``unroll`` N > 1 the drafter also runs N - 1 further steps on its own outputs
(``unroll.py``), as at inference, and step j's loss is weighted ``unroll_decay ** j``. With a truncated head (``head_vocab`` K) both distributions are over the K most frequent
assistant tokens (renormalised). The noise is uniform with amplitude 0.2: EAGLE's
``(rand - 0.5) · 0.2 · 512 / seq_len`` at seq_len 512, held fixed so short records are not drowned.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from drafters.eagle_model import EagleConfig, EagleDrafter, save_checkpoint
from drafters.train.loop import Recipe, TrainConfig, feature_losses, train_drafter
from drafters.train.unroll import unrolled, unrolled_losses


def state_shape(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Decoder layers and MLP width of an EAGLE-named drafter state."""
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    return layers, sd["layers.0.mlp.gate_proj.weight"].shape[0]


def deepened(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """An EAGLE-named drafter state grown to ``layers`` decoder layers (Net2Net-style): each new layer copies
    the last one with a unit input RMSNorm and zeroed ``o_proj`` and ``down_proj``, so it adds nothing to the
    residual stream and the deepened drafter drafts exactly as ``sd`` did until training moves it."""
    have = state_shape(sd)[0]
    last = f"layers.{have - 1}."
    out = dict(sd)
    for i in range(have, layers):
        new = f"layers.{i}."
        out.update({new + k[len(last):]: v.clone() for k, v in sd.items() if k.startswith(last)})
        out[new + "input_layernorm.weight"] = torch.ones_like(sd[last + "post_attention_layernorm.weight"])
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            out[new + name] = torch.zeros_like(sd[last + name])
    return out


def widened(sd: dict[str, torch.Tensor], intermediate: int, std: float = 0.02,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """An EAGLE-named drafter state with every layer's MLP grown to ``intermediate`` units: the new units' gate
    and up rows are drawn N(0, ``std``) (seeded) and their ``down_proj`` columns are zero, so the widened
    drafter drafts exactly as ``sd`` did until training moves them."""
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in sd if k.endswith("mlp.gate_proj.weight")]:
        prefix = key[:-len("gate_proj.weight")]
        have, hidden = sd[key].shape                                               # [I, H]
        if intermediate <= have:
            continue
        for name in ("gate_proj", "up_proj"):
            w = sd[prefix + name + ".weight"]
            new = torch.randn(intermediate - have, hidden, generator=gen).mul_(std).to(w.dtype)
            out[prefix + name + ".weight"] = torch.cat([w, new])                   # [I', H]
        down = sd[prefix + "down_proj.weight"]                                     # [H, I]
        out[prefix + "down_proj.weight"] = torch.cat([down, down.new_zeros(hidden, intermediate - have)], 1)
    return out


def fused(sd: dict[str, torch.Tensor], drafter: EagleDrafter) -> dict[str, torch.Tensor]:
    """An EAGLE-named drafter state given ``drafter``'s ``aux_fc`` (zero, when the state has none), so a drafter
    that learns to read the target's ``aux_layers`` drafts exactly as ``sd`` did until training moves it."""
    if not drafter.config.aux_layers or "aux_fc.weight" in sd:
        return sd
    return {**sd, "aux_fc.weight": torch.zeros_like(drafter.aux_fc.weight)}


def init_config(init: str | None) -> dict[str, Any]:
    """The ``init`` checkpoint's saved config (empty without one)."""
    return json.loads((Path(init) / "config.json").read_text()) if init else {}


def drafter_shape(cfg: TrainConfig) -> tuple[int, int | None]:
    """Decoder layers and MLP width to train: ``cfg``'s where given, else the ``init`` checkpoint's (else one
    layer at the target's width, ``None``)."""
    saved = init_config(cfg.init)
    return cfg.layers or saved.get("num_hidden_layers", 1), cfg.intermediate or saved.get("intermediate_size")


def drafter_aux_layers(given: tuple[int, ...], init: str | None) -> tuple[int, ...]:
    """The target layers the drafter reads: ``given``, else the ``init`` checkpoint's. An init that reads other
    layers than ``given`` cannot be continued (its ``aux_fc`` was trained on them)."""
    saved = tuple(init_config(init).get("aux_layers", ()))
    if given and saved and tuple(given) != saved:
        raise ValueError(f"the init checkpoint {init} reads target layers {list(saved)}, not {list(given)}: "
                         f"train from it with --aux-layers {' '.join(map(str, saved))} (or none, its default)")
    return tuple(given) or saved


def noisy(features: torch.Tensor, noise: float) -> torch.Tensor:
    """EAGLE's input noise: uniform in ``[-noise / 2, noise / 2)``."""
    return features + (torch.rand_like(features) - 0.5) * noise if noise else features


class EagleRecipe(Recipe):
    """EAGLE drafters."""

    method = "eagle"

    def __init__(self, save_dtype: torch.dtype = torch.float32, layers: int = 1, intermediate: int | None = None,
                 aux_layers: tuple[int, ...] = ()):
        super().__init__(save_dtype)
        self.layers, self.intermediate, self.aux_layers = layers, intermediate, tuple(aux_layers)

    def build(self, target_config: dict[str, Any], embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
              head_ids: torch.Tensor | None) -> EagleDrafter:
        cfg = EagleConfig.from_target(target_config, self.layers, intermediate_size=self.intermediate,
                                      aux_layers=self.aux_layers)
        return EagleDrafter(cfg, embed_weight, lm_head_weight, head_ids)

    def load_init(self, drafter: EagleDrafter, state: dict[str, torch.Tensor]) -> None:
        """Warm-start from ``state``, deepened and widened to ``drafter``'s shape (never shrunk)."""
        cfg = drafter.config
        layers, width = state_shape(state)
        if layers > cfg.num_hidden_layers or width > cfg.intermediate_size:
            raise ValueError(f"the init checkpoint has {layers} layers of MLP width {width}; the drafter to train "
                             f"has {cfg.num_hidden_layers} of width {cfg.intermediate_size} (a drafter only grows)")
        super().load_init(drafter, fused(widened(deepened(state, cfg.num_hidden_layers), cfg.intermediate_size),
                                         drafter))

    def losses(self, drafter: EagleDrafter, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               noise: float, epoch: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if cfg.unroll > 1:
            return self.unrolled_losses(drafter, batch, cfg, noise)
        pred, _ = drafter(batch["tokens"], noisy(batch["features"], noise), batch["positions"],
                          aux=batch.get("aux"))                                                # [B, T, H]
        out = feature_losses(drafter, pred, batch["targets"], batch["mask"])
        drafted, _ = out.pop("drafted"), out.pop("target_logits")
        return {"loss": cfg.v_weight * out["vloss"] + cfg.p_weight * out["ploss"], **out,
                "tokens": batch["mask"].sum()}, drafted

    @staticmethod
    def unrolled_losses(drafter: EagleDrafter, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                        noise: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Losses of ``cfg.unroll`` drafting steps; ``acc`` and the drafted ids are step 0's."""
        preds = unrolled(drafter, batch["tokens"], noisy(batch["features"], noise), batch["positions"],
                         cfg.unroll, batch.get("aux"))
        steps = unrolled_losses(drafter, preds, batch["targets"], batch["mask"])
        loss = sum(cfg.unroll_decay ** j * (cfg.v_weight * t["vloss"] + cfg.p_weight * t["ploss"])
                   for j, t in enumerate(steps))
        depth = {f"acc_d{j + 1}": t["acc"] for j, t in enumerate(steps[1:], start=1)}
        drafted = drafter.logits(preds[0]).detach().argmax(-1)                       # [B, T]
        return {"loss": loss, "vloss": steps[0]["vloss"], "ploss": steps[0]["ploss"], "acc": steps[0]["acc"],
                **depth, "tokens": steps[0]["tokens"]}, drafted

    def save(self, out: Path, drafter: EagleDrafter, extra: dict[str, Any]) -> None:
        save_checkpoint(out, drafter, drafter.config, extra, self.save_dtype)


def train_eagle(cfg: TrainConfig, target_config: dict[str, Any], embed_weight: torch.Tensor,
                lm_head_weight: torch.Tensor, save_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train (or resume) an EAGLE drafter for the target; writes the checkpoint and logs under ``cfg.out``."""
    cfg = replace(cfg, aux_layers=drafter_aux_layers(cfg.aux_layers, cfg.init))
    recipe = EagleRecipe(save_dtype, *drafter_shape(cfg), aux_layers=cfg.aux_layers)
    return train_drafter(recipe, cfg, target_config, embed_weight, lm_head_weight)
