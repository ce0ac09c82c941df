"""Test helpers: tiny random models and reference decoding."""

from __future__ import annotations

import torch


def tiny_hf_config(**overrides) -> dict:
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=211, hidden_size=64,
        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attention_bias=False, rope_scaling=None,
    )
    cfg.update(overrides)
    return cfg


def hf_model_from(cfg: dict, seed: int = 0):
    """A transformers Llama (Qwen2 for model_type qwen2) with random weights, fp32, eager."""
    import transformers

    family = "Qwen2" if cfg.get("model_type") == "qwen2" else "Llama"
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "attention_bias")}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def native_from(cfg: dict, state_dict: dict):
    from server.models.llama import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig.from_hf(cfg))
    model.load_hf_state_dict(state_dict)
    return model.eval()


def make_kv(cfg, num_blocks: int, block_size: int):
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
