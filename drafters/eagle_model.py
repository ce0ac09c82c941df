"""EAGLE-1/2 drafter network (weights layout of SafeAILab/EAGLE ``eagle/model/cnets1.py``).

The drafter reads, at position t, the target's post-norm feature ``f_t`` and the embedding of
the next token ``x_{t+1}``: ``h_t = fc(cat([embed(x_{t+1}), f_t]))``; one (or more) Llama decoder
layer(s) then predict ``f_{t+1}``, and the target's LM head turns that into a distribution over
``x_{t+2}``. Layer 0 has no input RMSNorm and there is no final norm. The embedding and LM head
belong to the target: they are passed in, frozen, and never saved with the drafter.

With ``aux_layers`` (EAGLE-3's fused features) the drafter also reads, where the target ran, the outputs
``a_t [k H]`` of those target decoder layers, each RMS-normalised: ``h_t = fc(cat([embed(x_{t+1}), f_t])) +
aux_fc(a_t)``. Drafted positions have no target layers to read (``a = 0``); their information reaches
the drafter through the keys and values of the context it attends to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from drafters.draft_kv import KV, ConcatKV, KVStore, Slots
from kernels.linear import Linear, linear
from server.models.llama import Attention, DecoderLayer, LlamaConfig
from server.models.rope import RotaryEmbedding

WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
# SDPA kernels for the drafter on CUDA: not cuDNN, which builds an execution plan per new shape (tens of ms on an
# H100, torch 2.11) and the drafter's key width changes every call; the first GPU run drafted at 161 ms a step.
CUDA_SDPA = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@dataclass
class EagleConfig(LlamaConfig):
    """The drafter's dims: a ``LlamaConfig`` (the target's, with the drafter's layer count; q/k/v without bias)
    plus EAGLE's ``bias`` of ``fc`` and the target decoder layers it reads besides the last (``aux_layers``,
    0-based; none for EAGLE-1/2)."""

    bias: bool = True
    aux_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], **overrides: Any) -> EagleConfig:
        """From an EAGLE ``config.json`` (or the target's HF Llama config plus ``overrides``)."""
        base = LlamaConfig.from_hf({"num_hidden_layers": 1, **cfg})
        values = {f.name: getattr(base, f.name) for f in fields(LlamaConfig)}
        values.update(attention_bias=bool(cfg.get("attention_bias", False)), bias=cfg.get("bias", True),
                      aux_layers=tuple(cfg.get("aux_layers", ())))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_target(cls, hf_cfg: dict[str, Any], num_hidden_layers: int = 1, bias: bool = True,
                    intermediate_size: int | None = None, aux_layers: tuple[int, ...] = ()) -> EagleConfig:
        """A drafter config for a target given by its HF ``config.json`` dict (MLP width: the target's unless
        ``intermediate_size`` is given)."""
        width = {} if intermediate_size is None else {"intermediate_size": intermediate_size}
        return cls.from_dict(hf_cfg, num_hidden_layers=num_hidden_layers, bias=bias, aux_layers=tuple(aux_layers),
                             **width)

    def to_dict(self) -> dict[str, Any]:
        """EAGLE ``config.json`` layout: a Llama config of the target's dims plus ``"bias"`` (and any fields a
        subclass adds)."""
        extra = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in LLAMA_FIELDS}
        return {**self.to_hf(), **extra}


LLAMA_FIELDS = {f.name for f in fields(LlamaConfig)}


class EagleAttention(Attention):
    """The Llama attention (same weights) over the keys a drafter cache returns (``Slots`` or ``ConcatKV``),
    batched ``[B, T, hidden]``, GQA via SDPA; ``index`` names the layer's heads in the cache."""

    def __init__(self, cfg: EagleConfig, index: int):
        super().__init__(cfg)
        self.index = index

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVStore,
                mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2)
                   for y in self.project(x.reshape(b * t, -1), rope))              # [B, H|Hkv, T, D]
        k, v = cache.store(self.index, k, v)                                       # [B, Hkv, L, D]
        out = attend(q, k, v, mask, causal)                                        # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool) -> torch.Tensor:
    """GQA attention ``q [B, H, T, D]`` over ``k``, ``v`` ``[B, Hkv, L, D]`` -> ``[B, H, T, D]`` (on CUDA with the
    kernels of ``CUDA_SDPA``)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    with sdpa_kernel(CUDA_SDPA):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def eagle_layer(cfg: EagleConfig, index: int) -> DecoderLayer:
    """A Llama decoder layer over a drafter cache; the first one (``index == 0``) has no input RMSNorm."""
    return DecoderLayer(cfg, EagleAttention(cfg, index), input_norm=index > 0)


def causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor:
    """Bool ``[1, 1, new, past + new]``: new token i sees every past token and new tokens <= i."""
    cols = torch.arange(past + new, device=device)
    return (cols[None, :] <= past + torch.arange(new, device=device)[:, None])[None, None]


class EagleDrafter(nn.Module):
    """``fc`` + decoder layer(s) over the target's frozen embedding and (optionally truncated) LM head.

    ``head_token_ids`` ``[K]`` (FR-Spec) restricts ``logits`` to those rows of the target LM head;
    ``to_target_ids`` maps head indices back to target token ids.
    """

    def __init__(self, cfg: EagleConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 head_token_ids: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.bias)
        if cfg.aux_layers:
            self.aux_fc = Linear(len(cfg.aux_layers) * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(eagle_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)   # [V, H]
        ids = None if head_token_ids is None else head_token_ids.long()
        self.register_buffer("head_token_ids", ids, persistent=False)                  # [K] or None
        head = lm_head_weight.detach() if ids is None else lm_head_weight.detach()[ids]
        self.register_buffer("head_weight", head, persistent=False)                     # [K or V, H]

    @property
    def kv_heads(self) -> int:
        return self.config.num_key_value_heads

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target token embedding: ``[...]`` -> ``[..., H]``."""
        return F.embedding(tokens, self.embed_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> ``[..., K]`` (or ``[..., V]`` without a truncated head)."""
        return linear(hidden, self.head_weight)

    def to_target_ids(self, head_ids: torch.Tensor) -> torch.Tensor:
        """Indices into ``logits``' last dim -> target vocabulary ids."""
        return head_ids if self.head_token_ids is None else self.head_token_ids[head_ids]

    def cast_matrices(self, dtype: torch.dtype) -> EagleDrafter:
        """Weight matrices (``fc``, the layers' projections, Gumiho's MLPs, the LM-head rows) in ``dtype``;
        activations, norms, biases and the KV keep the target's dtype (``kernels.linear`` runs fp32
        activations times bf16 matrices in bf16 on the CPU, reading half the bytes)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.to(dtype)
        self.head_weight = self.head_weight.to(dtype)
        return self

    def fuse(self, tokens: torch.Tensor, features: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        """``fc(cat([embed(x), f])) (+ aux_fc(norm(a)))``: tokens ``[...]``, features ``[..., H]``, aux
        ``[..., k H]`` (None: drafted positions) -> ``[..., H]``."""
        dtype = self.embed_weight.dtype
        x = self.fc(torch.cat([self.embed(tokens).to(dtype), features.to(dtype)], dim=-1))
        if aux is None or not self.config.aux_layers:
            return x
        hidden = self.config.hidden_size
        normed = F.rms_norm(aux.to(dtype).unflatten(-1, (-1, hidden)), (hidden,), eps=self.config.rms_norm_eps)
        return x + self.aux_fc(normed.flatten(-2))                                   # [..., H]

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                past: KV | None = None, attn_mask: torch.Tensor | None = None,
                aux: torch.Tensor | None = None) -> tuple[torch.Tensor, KV]:
        """Draft ``f̂_{t+1}`` from ``(x_{t+1}, f_t)`` pairs.

        tokens ``[B, T]``, features ``[B, T, H]``, positions ``[B, T]``; ``past`` is the KV of
        earlier calls, each ``[B, Hkv * layers, P, D]``; ``attn_mask`` bool ``[B, 1, T, P + T]``
        (True = attend), None = causal over past + new; ``aux`` ``[B, T, k H]`` the target's
        ``aux_layers`` outputs (None: drafted features). Returns hidden ``[B, T, H]`` and the KV
        including the past, each ``[B, Hkv * layers, P + T, D]`` (layer i owns heads
        ``[i * Hkv, (i + 1) * Hkv)``).
        """
        if attn_mask is None and past is not None:
            attn_mask = causal_mask(tokens.shape[1], past[0].shape[2], tokens.device)
        cache = ConcatKV(past, self.kv_heads)
        return self._run(tokens, features, positions, cache, attn_mask, attn_mask is None, aux), cache.result()

    def step(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, slots: Slots,
             attn_mask: torch.Tensor | None, aux: torch.Tensor | None = None) -> torch.Tensor:
        """As ``forward``, with the new keys/values written into ``slots`` in place and attention over its
        first ``slots.width`` columns; ``attn_mask`` ``[B, 1, T, width]`` (bool, or additive float in the
        model's dtype), None = attend to every column. Returns hidden ``[B, T, H]``."""
        return self._run(tokens, features, positions, slots, attn_mask, False, aux)

    def _run(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, cache: KVStore,
             attn_mask: torch.Tensor | None, causal: bool, aux: torch.Tensor | None = None) -> torch.Tensor:
        x = self.fuse(tokens, features, aux)                                         # [B, T, H]
        rope = self.rope.tables(positions.reshape(-1), x.dtype)                     # [B * T, 1, D] each
        for layer in self.layers:
            x = layer(x, rope, cache, attn_mask, causal)
        return x


def own_state(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """EAGLE names (separate q/k/v and gate/up) -> this module's fused names (other modules as is)."""
    own = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for i in range(num_layers):
        p = f"layers.{i}."
        own[p + "self_attn.qkv_proj.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        own[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight",
                     "input_layernorm.weight"):
            if p + name in sd:
                own[p + name] = sd[p + name]
    return own


def _eagle_state(drafter: EagleDrafter) -> dict[str, torch.Tensor]:
    """This module's fused weights -> EAGLE names (modules outside ``layers`` as is)."""
    cfg, sd = drafter.config, drafter.state_dict()
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for n, w in zip("qkv", sd[p + "self_attn.qkv_proj.weight"].split([q, kv, kv])):
            out[p + f"self_attn.{n}_proj.weight"] = w
        gate, up = sd[p + "mlp.gate_up_proj.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        fused = ("qkv_proj", "gate_up_proj")
        out.update({k: v for k, v in sd.items() if k.startswith(p) and not any(f in k for f in fused)})
    return out


def save_checkpoint(directory: str | Path, drafter: EagleDrafter, config: EagleConfig,
                    extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` (EAGLE layout, plus ``extra`` under ``"treespec"``) and ``model.safetensors``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in _eagle_state(drafter).items()}
    if drafter.head_token_ids is not None:
        tensors["head_token_ids"] = drafter.head_token_ids.detach().cpu().contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(json.dumps({**config.to_dict(), "treespec": extra or {}}, indent=2))
    return out


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop any leading prefix before ``fc.`` / ``aux_fc.`` / ``layers.`` / ``mlp.`` (Gumiho) and the (ignored)
    ``embed_tokens`` key."""
    out = {}
    for key, value in sd.items():
        for anchor in ("fc.", "aux_fc.", "layers.", "mlp.", "head_token_ids"):
            at = key.find(anchor)
            if at == 0 or (at > 0 and key[at - 1] == "."):
                out[key[at:]] = value
                break
    return out


def _weight(module_or_tensor: nn.Module | torch.Tensor) -> torch.Tensor:
    return module_or_tensor if isinstance(module_or_tensor, torch.Tensor) else module_or_tensor.weight


FREQ_FILE = "token_freq.pt"  # int64 [V] token counts shipped beside a checkpoint (FR-Spec head choice)


def frequent_tokens(directory: str | Path, k: int) -> torch.Tensor:
    """The ``k`` most frequent token ids (ascending) from ``token_freq.pt`` beside a checkpoint."""
    f = Path(directory) / FREQ_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f} is needed to choose a truncated drafter head")
    counts = torch.load(f, weights_only=True)
    return counts.topk(min(k, counts.numel())).indices.sort().values


def read_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights (``model.safetensors`` or ``pytorch_model.bin``, any key prefix)."""
    folder = Path(directory)
    cfg_dict = json.loads((folder / "config.json").read_text())
    if (folder / WEIGHTS_FILE).is_file():
        raw = load_file(str(folder / WEIGHTS_FILE))
    elif (folder / LEGACY_WEIGHTS_FILE).is_file():
        raw = torch.load(folder / LEGACY_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE} in {folder}")
    return cfg_dict, _strip_prefix(raw)


def assemble(cls: type[EagleDrafter], cfg: EagleConfig, sd: dict[str, torch.Tensor], folder: str | Path,
             embed: nn.Module | torch.Tensor, lm_head: nn.Module | torch.Tensor,
             head_vocab: int | None) -> EagleDrafter:
    """Build ``cls`` on the target's embedding and LM head and load ``sd`` (EAGLE names) into it."""
    head_ids = sd.pop("head_token_ids", None)
    if head_vocab is not None:
        head_ids = frequent_tokens(folder, head_vocab) if head_vocab else None
    embed_w, head_w = _weight(embed), _weight(lm_head)
    drafter = cls(cfg, embed_w, head_w, head_ids).to(device=embed_w.device, dtype=embed_w.dtype)  # target's device
    own = own_state(sd, cfg.num_hidden_layers)
    drafter.load_state_dict({k: v.to(embed_w.dtype) for k, v in own.items()})
    return drafter.eval()


def load_checkpoint(directory: str | Path, embed: nn.Module | torch.Tensor,
                    lm_head: nn.Module | torch.Tensor, head_vocab: int | None = None) -> EagleDrafter:
    """Load a treespec or SafeAILab EAGLE-1/2 checkpoint onto the target's ``embed`` and ``lm_head``.

    Accepts ``model.safetensors`` or ``pytorch_model.bin``; keys may carry a prefix and may include
    ``embed_tokens.weight``, which is ignored (the target's embedding is used). ``head_vocab``
    overrides the checkpoint's head: 0 = full vocabulary, K = the K most frequent tokens.
    """
    cfg_dict, sd = read_checkpoint(directory)
    return assemble(EagleDrafter, EagleConfig.from_dict(cfg_dict), sd, directory, embed, lm_head, head_vocab)
