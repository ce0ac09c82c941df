"""Medusa heads (weights layout of FasterDecoding/Medusa ``medusa/model/medusa_model.py``).

Every head reads the target's last post-norm hidden state ``f_t`` (the feature whose LM-head
argmax chose the tree root) and drafts one later token: head ``i`` the token ``i + 1`` positions
after the root. Head ``i`` is ``n`` residual blocks ``x + SiLU(Linear(x))`` (zero-initialised, so
an untrained head starts as the identity; Medusa
zeroes the weight only) followed by a vocabulary head, one of:

- the target's own LM head, frozen and never saved (only the blocks are weights), or
- a trained ``Linear(H, K)`` per head over the ``K`` most frequent tokens (FR-Spec; ``K = V`` with
  no ``head_token_ids`` is Medusa's own full head).

Checkpoint folder: ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``, plus the dims and
``treespec`` extras) and ``medusa_lm_head.safetensors`` with Medusa's names ``{i}.{j}.linear.weight``
/ ``.bias`` (block ``j`` of head ``i``), ``{i}.{n}.weight`` (the trained vocabulary head) and
``head_token_ids`` ``[K]``; FasterDecoding's ``medusa_lm_head.pt`` loads the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from drafters.gumiho_model import HeadBlock
from kernels.linear import linear

WEIGHTS_FILE = "medusa_lm_head.safetensors"
LEGACY_WEIGHTS_FILE = "medusa_lm_head.pt"
_BLOCK_KEY = re.compile(r"^(\d+)\.(\d+)\.linear\.weight$")
_BLOCK_PARAM = re.compile(r"^\d+\.\d+\.linear\.(weight|bias)$")


@dataclass
class MedusaHeadsSpec:
    """Shape of a set of Medusa heads; ``trained_head``: each head has its own vocabulary ``Linear``."""

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    trained_head: bool = False

    def to_dict(self) -> dict[str, Any]:
        """FasterDecoding's ``medusa_num_heads`` / ``medusa_num_layers`` plus the rest of the spec."""
        return {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers, **asdict(self)}


class MedusaHeads(nn.Module):
    """``num_heads`` heads over ``f_t``: ``[..., H]`` -> features ``[..., D, H]`` -> logits ``[..., D, K]``.

    ``head_weight`` ``[K or V, H]`` is the target LM head (rows ``head_token_ids`` when truncated): the
    frozen vocabulary head, or the initial value of the trained per-head ones ``out [D, K, H]``.
    """

    def __init__(self, spec: MedusaHeadsSpec, lm_head_weight: torch.Tensor, head_token_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = spec
        self.blocks = nn.ModuleList(
            nn.Sequential(*(HeadBlock(spec.hidden_size, spec.hidden_size, residual=True)
                            for _ in range(spec.num_layers)))
            for _ in range(spec.num_heads))
        for block in self.modules():
            if isinstance(block, HeadBlock):
                nn.init.zeros_(block.linear.bias)                       # with the zero weight: the identity
        ids = None if head_token_ids is None else head_token_ids.long()
        self.register_buffer("head_token_ids", ids, persistent=False)                  # [K] or None
        head = lm_head_weight.detach() if ids is None else lm_head_weight.detach()[ids]
        self.register_buffer("head_weight", head, persistent=False)                     # [K or V, H]
        self.out = (nn.Parameter(head.float().clone()[None].repeat(spec.num_heads, 1, 1))   # [D, K, H]
                    if spec.trained_head else None)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def forward(self, hidden: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """Features of the first ``heads`` heads: ``[..., H]`` -> ``[..., heads, H]``."""
        x = hidden.to(self.head_weight.dtype if self.out is None else self.out.dtype)
        return torch.stack([block(x) for block in self.blocks[:heads or self.num_heads]], dim=-2)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Head ``i``'s vocabulary head on ``features[..., i, :]``: ``[..., d, H]`` -> ``[..., d, K]``."""
        if self.out is None:
            return linear(features, self.head_weight.to(features.dtype))
        weight = self.out[:features.shape[-2]].to(features.dtype)                      # [d, K, H]
        return torch.einsum("...dh,dkh->...dk", features, weight)

    def head_logits(self, features: torch.Tensor, i: int) -> torch.Tensor:
        """Head ``i``'s vocabulary head alone: ``[..., H]`` -> ``[..., K]``."""
        weight = self.head_weight if self.out is None else self.out[i]
        return linear(features, weight.to(features.dtype))

    def to_target_ids(self, head_ids: torch.Tensor) -> torch.Tensor:
        """Indices into ``logits``' last dim -> target vocabulary ids."""
        return head_ids if self.head_token_ids is None else self.head_token_ids[head_ids]

    def medusa_state(self) -> dict[str, torch.Tensor]:
        """Medusa's names: ``{i}.{j}.linear.*`` per block, ``{i}.{n}.weight`` per trained head."""
        n = self.config.num_layers
        state = {key.removeprefix("blocks."): value for key, value in self.blocks.state_dict().items()}
        if self.out is not None:
            state.update({f"{i}.{n}.weight": self.out[i] for i in range(self.num_heads)})
        if self.head_token_ids is not None:
            state["head_token_ids"] = self.head_token_ids
        return state

    def load_medusa_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``medusa_state`` (missing or extra heads and blocks are an error)."""
        n = self.config.num_layers
        own = {f"blocks.{k}": v for k, v in state.items() if _BLOCK_PARAM.match(k)}
        if (f"0.{n}.weight" in state) != (self.out is not None):
            have, want = (("trained", "frozen") if self.out is None else ("frozen", "trained"))
            raise ValueError(f"the weights have {have} vocabulary heads, these heads a {want} one "
                             "(--medusa-head must match the --init checkpoint)")
        if self.out is not None:
            own["out"] = torch.stack([state[f"{i}.{n}.weight"] for i in range(self.num_heads)])
        self.load_state_dict(own)


def save_medusa(directory: str | Path, heads: MedusaHeads, extra: dict[str, Any] | None = None,
                dtype: torch.dtype = torch.float16) -> Path:
    """Write ``config.json`` and ``medusa_lm_head.safetensors`` (weights in ``dtype``, token ids as is)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if k == "head_token_ids" else v.to(dtype)).detach().cpu().contiguous()
               for k, v in heads.medusa_state().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(json.dumps({**heads.config.to_dict(), "treespec": extra or {}}, indent=2))
    return out


def read_medusa(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights: ``medusa_lm_head.safetensors`` or FasterDecoding's ``.pt``."""
    folder = Path(directory)
    cfg = json.loads((folder / "config.json").read_text())
    if (folder / WEIGHTS_FILE).is_file():
        return cfg, load_file(str(folder / WEIGHTS_FILE))
    if (folder / LEGACY_WEIGHTS_FILE).is_file():
        return cfg, torch.load(folder / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE} in {folder}")


def spec_of(cfg: dict[str, Any], state: dict[str, torch.Tensor], lm_head_weight: torch.Tensor) -> MedusaHeadsSpec:
    """The spec of a checkpoint: head and block counts from ``config.json`` (else the weight names), a
    trained vocabulary head when ``{i}.{n}.weight`` tensors are present."""
    blocks = [tuple(map(int, m.groups())) for m in map(_BLOCK_KEY.match, state) if m]
    if not blocks:
        raise ValueError("not a Medusa checkpoint: no <head>.<block>.linear.weight tensors")
    heads = int(cfg.get("medusa_num_heads", max(i for i, _ in blocks) + 1))
    layers = int(cfg.get("medusa_num_layers", max(j for _, j in blocks) + 1))
    vocab, hidden = lm_head_weight.shape
    return MedusaHeadsSpec(hidden, vocab, heads, layers, trained_head=f"0.{layers}.weight" in state)


def load_medusa(directory: str | Path, lm_head: nn.Module | torch.Tensor) -> MedusaHeads:
    """Medusa heads of a treespec or FasterDecoding checkpoint on the target's ``lm_head`` (its device and
    dtype; with a trained head of ``V`` rows the target's head is only the initial value)."""
    weight = lm_head if isinstance(lm_head, torch.Tensor) else lm_head.weight
    cfg, state = read_medusa(directory)
    spec = spec_of(cfg, state, weight)
    heads = MedusaHeads(spec, weight.detach().float(), state.get("head_token_ids"))
    heads.load_medusa_state(state)
    return heads.to(device=weight.device, dtype=weight.dtype).eval()
