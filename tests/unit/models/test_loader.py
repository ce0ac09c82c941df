"""Weight loading: GGUF (written the way llama.cpp does) and safetensors folders map to HF Llama names."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import tiny_hf_config
from safetensors.torch import save_file

from server.models.loader import load_gguf, load_safetensors_folder, load_tokenizer, load_weights

_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_hf_state(cfg: dict, bias: bool, lm_head: bool) -> dict[str, np.ndarray]:
    """Random fp32 weights in Hugging Face Llama naming."""
    rng = np.random.default_rng(0)
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if lm_head:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv))}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"


def write_llama_gguf(path: Path, cfg: dict, state: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType,
                     rope_scaling: tuple[gguf.RopeScalingType, float, int] | None = None) -> None:
    """Write ``state`` as llama.cpp's converter would: permuted q/k, 2-D weights in ``qtype``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling[0])
        writer.add_rope_scaling_factor(rope_scaling[1])
        writer.add_rope_scaling_orig_ctx_len(rope_scaling[2])
    for name, w in state.items():
        if ".q_proj." in name:
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_f32_exact_with_bias_untied_and_rope_scaling(tmp_path: Path) -> None:
    cfg = tiny_hf_config(tie_word_embeddings=False, attention_bias=True)
    state = random_hf_state(cfg, bias=True, lm_head=True)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, cfg, state, gguf.GGMLQuantizationType.F32, (gguf.RopeScalingType.LINEAR, 4.0, 256))

    config, loaded = load_weights(path)

    assert loaded.keys() == state.keys()
    for name, ref in state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], torch.from_numpy(ref)), name
    expected = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    assert {k: config[k] for k in expected} == expected
    scaling = {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 256}
    assert config["rope_scaling"] == scaling


def test_gguf_q8_0_close_tied_without_bias(tmp_path: Path) -> None:
    cfg = tiny_hf_config()
    state = random_hf_state(cfg, bias=False, lm_head=False)
    path = tmp_path / "tiny-q8.gguf"
    write_llama_gguf(path, cfg, state, gguf.GGMLQuantizationType.Q8_0)

    config, loaded = load_gguf(path)

    assert loaded.keys() == state.keys()
    for name, ref in state.items():
        step = float(np.abs(ref).max()) / 127  # Q8_0 error is at most half a step of its block scale
        torch.testing.assert_close(loaded[name], torch.from_numpy(ref), atol=step, rtol=0, msg=name)
    assert config["tie_word_embeddings"] is True
    assert config["attention_bias"] is False
    assert config["rope_scaling"] is None
    assert config["num_key_value_heads"] == cfg["num_key_value_heads"]
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"


def test_safetensors_sharded_folder_round_trip(tmp_path: Path) -> None:
    cfg = tiny_hf_config()
    state = {k: torch.from_numpy(v) for k, v in random_hf_state(cfg, bias=False, lm_head=False).items()}
    names = sorted(state)
    half = len(names) // 2
    first = {k: state[k].to(torch.bfloat16) for k in names[:half]}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    config, loaded = load_weights(tmp_path)

    assert config == cfg
    assert loaded.keys() == state.keys()
    for name in names:
        assert loaded[name].dtype == torch.float32
        expected = state[name].to(torch.bfloat16).float() if name in names[:half] else state[name]
        assert torch.equal(loaded[name], expected), name


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_safetensors_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_weights(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model file"):
        load_weights(other)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
