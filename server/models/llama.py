"""Native Llama-family decoder (Llama 2/3, SmolLM2, Qwen2-style QKV bias, Mistral) over a paged KV cache.

Tokens of all sequences in a step are flattened into one ``[T]`` batch; attention goes
through ``kernels`` with per-step ``AttentionMetadata``. Weights use Hugging Face names
on load; q/k/v and gate/up projections are fused for speed.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from kernels.backend import AttentionBackend
from kernels.linear import Linear
from kernels.metadata import AttentionMetadata
from server.models.rope import RotaryEmbedding, apply_rotary


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict (Llama, Qwen2, Mistral)."""
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` fields ``from_hf`` reads (``from_hf(c.to_hf()) == c``)."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
                "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
                "eos_token_id": list(self.eos_token_ids), "bos_token_id": self.bos_token_id}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, hidden]`` -> rotated ``q [T, H, D]``, rotated ``k [T, Hkv, D]`` and ``v [T, Hkv, D]``."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), *rope)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), *rope)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.project(x, rope)                                          # [T, H|Hkv, D]
        backend.write_kv(k, v, kv[0], kv[1], meta)
        out = backend.attend(q, kv[0], kv[1], meta, self.scale)                 # [T, H, D]
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer. ``attention`` replaces the paged ``Attention`` (drafters attend over their own
    caches with the same weights layout); ``input_norm=False`` drops the input RMSNorm (EAGLE's first layer)."""

    def __init__(self, cfg: LlamaConfig, attention: Attention | None = None, input_norm: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else nn.Identity()
        self.self_attn = attention or Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, *attention_args, skip_attn: bool = False, skip_mlp: bool = False):
        """``attention_args`` go to the attention after ``(x, rope)`` (paged: ``kv, meta, backend``). A skipped
        sub-layer passes the residual through (and a skipped attention writes no KV)."""
        if not skip_attn:
            x = x + self.self_attn(self.input_layernorm(x), rope, *attention_args)
        if not skip_mlp:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaModel(nn.Module):
    """Decoder stack + LM head. ``forward`` returns post-norm features (the EAGLE feature), followed by the
    outputs of the decoder layers ``aux_layers`` (0-based; set by the runner for a drafter that reads them)."""

    aux_layers: tuple[int, ...] = ()

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                backend: AttentionBackend, skip_attn: Collection[int] = (),
                skip_mlp: Collection[int] = ()) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> post-norm hidden ``[T, hidden]`` (``[T, (1 + k) hidden]`` with
        ``k`` ``aux_layers``); ``meta`` was built by ``backend`` (the runner's choice for its device).
        ``skip_attn``/``skip_mlp``: layers whose attention / MLP sub-layer is skipped (SWIFT's
        self-speculative drafting; empty for the target itself)."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions, x.dtype)
        taps = []
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, rope, kv, meta, backend, skip_attn=i in skip_attn, skip_mlp=i in skip_mlp)
            if i in self.aux_layers:
                taps.append(x)                                                  # [T, hidden]
        return torch.cat([self.norm(x), *taps], dim=-1) if taps else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` (or ``forward``'s wider rows: their first ``hidden`` columns) -> ``[N, vocab]``."""
        return self.lm_head(hidden[..., :self.config.hidden_size])

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights, fusing q/k/v and gate/up projections."""
        own: dict[str, torch.Tensor] = {}
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
            if self.config.attention_bias:
                own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
            own[f"layers.{i}.self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat(
                [sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            own[f"layers.{i}.mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[f"layers.{i}.{norm}.weight"] = sd[p + f"{norm}.weight"]
        own["embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        own["norm.weight"] = sd["model.norm.weight"]
        own["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weight mismatch: missing={missing} unexpected={unexpected}")
