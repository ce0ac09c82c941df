"""The native Llama matches transformers on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model_from, make_kv, native_from, tiny_hf_config

from kernels import ReferenceBackend, SeqAttention


def native_logits(model, ids: list[int], chunks: list[int], block_size: int = 4) -> torch.Tensor:
    """Run ``ids`` through the paged model in the given chunk sizes (prefill then decode steps)."""
    kv = make_kv(model.config, num_blocks=64, block_size=block_size)
    table = list(range(63, 63 - (len(ids) + block_size) // block_size - 1, -1))  # non-contiguous blocks
    out, done, backend = [], 0, ReferenceBackend(block_size)
    for n in chunks:
        meta = backend.build_metadata([SeqAttention(table, done, n)])
        hidden = model(torch.tensor(ids[done:done + n]), torch.arange(done, done + n), kv, meta, backend)
        out.append(model.compute_logits(hidden))
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_bias": True, "model_type": "qwen2"},
    {"tie_word_embeddings": False, "num_key_value_heads": 4},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
])
def test_tiny_logits_match_transformers(overrides):
    cfg = tiny_hf_config(**overrides)
    hf = hf_model_from(cfg)
    model = native_from(cfg, hf.state_dict())
    ids = torch.randint(0, cfg["vocab_size"], (23,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got = native_logits(model, ids, [15, 1, 1, 6])
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=1e-4)   # 30 layers of fp32 GEMMs in another order


@pytest.mark.slow
def test_smollm2_logits_match_transformers(default_model_dir):
    from transformers import LlamaForCausalLM

    from server.models.loader import load_weights

    cfg, sd = load_weights(default_model_dir)
    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    model = native_from(cfg, sd)
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
           8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got = native_logits(model, ids, [30, 1, 1, 5], block_size=16)
    torch.testing.assert_close(got, ref, atol=3e-4, rtol=1e-4)   # 30 layers of fp32 GEMMs in another order
