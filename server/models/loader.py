"""Load Llama-family weights into Hugging Face names as fp32 tensors.

Two sources are supported: a Hugging Face folder (``config.json`` plus one or more
``*.safetensors`` shards) and a single llama.cpp GGUF file. For GGUF the tensors are
dequantised with ``gguf.quants.dequantize``, renamed, and llama.cpp's rotary
permutation of the q/k projections is undone, so both sources yield the same layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Architectures whose converter applies the rotary permutation to q/k (convert_hf_to_gguf's LlamaModel).
_PERMUTED_ARCHS = {"llama"}


def load_safetensors_folder(path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """Read ``config.json`` and every ``*.safetensors`` shard of a Hugging Face folder.

    Returns the config dict and the merged state dict with floating tensors cast to fp32.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in model folder {folder}")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in model folder {folder}")
    config = json.loads(config_file.read_text())
    state: StateDict = {}
    for shard in shards:
        for name, tensor in load_file(str(shard)).items():
            if name in state:
                raise ValueError(f"tensor {name!r} appears in more than one shard of {folder}")
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return config, state


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation (interleaved rotary pairs back to rotate-half rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """Scalar, string or array value of a GGUF metadata key, or ``default`` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _as_float(value: Any) -> float:
    """Shortest decimal of a float32 metadata value (``1e-05`` rather than ``9.99999974e-06``)."""
    return float(str(np.float32(value)))


def _hf_name(gguf_name: str) -> str:
    """Hugging Face Llama name of a GGUF tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """HF ``rope_scaling`` dict from ``{arch}.rope.scaling.*`` metadata, or None."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    factor = _as_float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _gguf_config(reader: GGUFReader, arch: str, state: StateDict) -> dict[str, Any]:
    """Hugging Face style Llama config built from GGUF metadata (and tensor shapes)."""
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = state["model.embed_tokens.weight"].shape[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": _as_float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _as_float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "rope_scaling": _rope_scaling(reader, arch),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in state,
    }


def load_gguf(path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """Read a llama.cpp GGUF file into an HF-style config dict and an fp32 HF-named state dict."""
    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture", "llama")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    permute_heads = {"attn_q": heads, "attn_k": kv_heads} if arch in _PERMUTED_ARCHS else {}
    state: StateDict = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        part = tensor.name.split(".")[-2]
        if part in permute_heads:
            values = unpermute_rotary(values, permute_heads[part])
        state[_hf_name(tensor.name)] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
    return _gguf_config(reader, arch, state), state


def load_tokenizer(path: str | Path) -> Any:
    """A ``transformers`` tokenizer from a model folder or from the vocabulary inside a GGUF file."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"tokenizer path {target} does not exist")
    from transformers import AutoTokenizer  # imported lazily: slow, and only needed here

    if target.is_file():
        return AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name)
    return AutoTokenizer.from_pretrained(str(target))


def load_weights(path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """Load ``(config, state_dict)`` from a Hugging Face safetensors folder or a ``.gguf`` file."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"model path {target} does not exist")
    if target.is_dir():
        return load_safetensors_folder(target)
    if target.suffix.lower() == ".gguf":
        return load_gguf(target)
    raise ValueError(f"unsupported model file {target}: expected a folder with safetensors or a .gguf file")
