"""Gumiho drafter network (weights layout of AMD-AIG-AIMA/Gumiho ``gumiho/model/cnets.py``).

A serial head, the EAGLE drafter with 2 decoder layers (``EagleDrafter``), drafts the first
draft tokens autoregressively. ``mlp_num`` parallel MLP heads then each predict the feature of
one later position at once, from the last two serial steps::

    mlp_in = cat(fc(embed(tok_a), h_a), fc(embed(tok_b), h_b))        # [..., 2H]
    mlp_i(mlp_in) -> f̂ at serial position + 1 + i                    # [..., H]

where ``h_a`` is the serial output that predicted ``tok_a`` and ``h_b`` the one that predicted
``tok_b`` (the token after ``tok_a``). Each MLP is ``SiLU(Linear(2H -> H))`` followed by
``mlp_res_blocks`` residual blocks ``x + SiLU(Linear(x))``, every weight zero-initialised.
Gumiho's ``config.json`` does not record ``mlp_num`` / the block count; they are read off the
weight names (``mlp.mlp.{i}.{j}.linear.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drafters.eagle_model import EagleConfig, EagleDrafter, assemble, read_checkpoint, save_checkpoint
from kernels.linear import Linear


@dataclass
class GumihoConfig(EagleConfig):
    """EAGLE drafter dims (Gumiho's serial head has 2 layers: ``num_hidden_layers``) plus the parallel heads'
    shape."""

    mlp_num: int = 5
    mlp_res_blocks: int = 5


class HeadBlock(nn.Module):
    """``SiLU(Linear(x))`` (plus ``x`` when ``residual``), weight zero-initialised."""

    def __init__(self, width_in: int, width_out: int, residual: bool):
        super().__init__()
        self.linear = Linear(width_in, width_out, bias=True)
        nn.init.zeros_(self.linear.weight)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.linear(x))
        return x + y if self.residual else y


class ParallelMLPs(nn.Module):
    """``mlp_num`` independent heads: ``[..., 2H]`` -> ``[..., mlp_num, H]``."""

    def __init__(self, hidden: int, mlp_num: int, res_blocks: int):
        super().__init__()
        self.mlp = nn.ModuleList(
            nn.Sequential(HeadBlock(2 * hidden, hidden, residual=False),
                          *(HeadBlock(hidden, hidden, residual=True) for _ in range(res_blocks)))
            for _ in range(mlp_num))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.mlp], dim=-2)

    def head(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Head ``i`` alone: ``[..., 2H]`` -> ``[..., H]`` (as ``forward(x)[..., i, :]``)."""
        return self.mlp[i](x)


class GumihoDrafter(EagleDrafter):
    """Serial EAGLE-style transformer (``forward``) plus parallel MLP heads (``parallel``)."""

    def __init__(self, cfg: GumihoConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 head_token_ids: torch.Tensor | None = None):
        super().__init__(cfg, embed_weight, lm_head_weight, head_token_ids)
        self.mlp = ParallelMLPs(cfg.hidden_size, cfg.mlp_num, cfg.mlp_res_blocks)

    def parallel(self, tok_a: torch.Tensor, h_a: torch.Tensor, tok_b: torch.Tensor,
                 h_b: torch.Tensor) -> torch.Tensor:
        """Features of the ``mlp_num`` positions after ``tok_b``.

        tokens ``[...]``, features ``[..., H]`` -> ``[..., mlp_num, H]``.
        """
        return self.mlp(self.mlp_input(tok_a, h_a, tok_b, h_b))

    def mlp_input(self, tok_a: torch.Tensor, h_a: torch.Tensor, tok_b: torch.Tensor,
                  h_b: torch.Tensor) -> torch.Tensor:
        """The heads' shared input ``cat(fc(embed(tok_a), h_a), fc(embed(tok_b), h_b))``: ``[..., 2H]``."""
        return torch.cat([self.fuse(tok_a, h_a), self.fuse(tok_b, h_b)], dim=-1)


_MLP_KEY = re.compile(r"^mlp\.mlp\.(\d+)\.(\d+)\.linear\.weight$")


def head_shape(sd: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(mlp_num, mlp_res_blocks)`` read off Gumiho weight names."""
    found = [tuple(map(int, m.groups())) for m in map(_MLP_KEY.match, sd) if m]
    if not found:
        raise ValueError("not a Gumiho checkpoint: no mlp.mlp.<i>.<j>.linear.weight tensors")
    return max(i for i, _ in found) + 1, max(j for _, j in found)


def load_gumiho_checkpoint(directory: str | Path, embed: nn.Module | torch.Tensor,
                           lm_head: nn.Module | torch.Tensor, head_vocab: int | None = None) -> GumihoDrafter:
    """Load a treespec or AMD-AIG-AIMA/Gumiho checkpoint onto the target's ``embed`` and ``lm_head``."""
    cfg_dict, sd = read_checkpoint(directory)
    mlp_num, res_blocks = head_shape(sd)
    cfg = GumihoConfig.from_dict(cfg_dict, mlp_num=mlp_num, mlp_res_blocks=res_blocks)
    return assemble(GumihoDrafter, cfg, sd, directory, embed, lm_head, head_vocab)


def save_gumiho_checkpoint(directory: str | Path, drafter: GumihoDrafter, extra: dict[str, Any] | None = None,
                           dtype: torch.dtype = torch.float32) -> Path:
    """``config.json`` (Gumiho/EAGLE layout plus ``mlp_num``, ``mlp_res_blocks``) and the weights."""
    return save_checkpoint(directory, drafter, drafter.config, extra, dtype)
