"""EAGLE-2 dynamic trees: structure, batching consistency, losslessness in the engine."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_batched_drafts_equal_solo,
    assert_drafter_lossless,
    feed_random_context,
)

from drafters.base import DraftRequest
from drafters.eagle import EagleTreeDrafter
from server.engine.request import SamplingParams

FULL = 10**6


def test_pool_and_tree_structure(tiny_eagle):
    _, _, net = tiny_eagle
    d = EagleTreeDrafter(net, total_tokens=10, depth=3, top_k=3)
    feed_random_context(d, "a", [5, 6, 7, 8, 9])
    pool = d.draft(["a"], 3, 3, [FULL])                               # a budget no pool reaches: no early stop
    assert pool.tokens.shape == (1, 3 + 3 * 9)                       # k + depth * k^2
    parents = pool.parents[0].tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents))
    scores = pool.scores[0]
    assert all(scores[i] <= scores[p] + 1e-6 for i, p in enumerate(parents) if p >= 0)
    tree = d.propose([DraftRequest("a", [5, 6, 7, 8, 9], SamplingParams(), budget=10)])[0]
    assert len(tree) == 10 and tree.max_depth <= 4                   # depth + 1 at most


def test_batched_expansion_equals_one_by_one(tiny_eagle):
    _, _, net = tiny_eagle
    contexts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    assert_batched_drafts_equal_solo(lambda: EagleTreeDrafter(net, total_tokens=12, depth=3, top_k=3), contexts, 12)


@pytest.mark.parametrize("batch", [1, 8])
def test_random_eagle_drafter_is_lossless(tiny_eagle, batch):
    hf, target, net = tiny_eagle
    assert_drafter_lossless(hf, target, EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3), batch, seed=2)


@pytest.mark.parametrize("batch", [1, 8])
def test_bf16_weight_matrices_draft_close_to_fp32_and_stay_lossless(tiny_eagle, batch):
    import copy

    hf, target, net = tiny_eagle
    half = copy.deepcopy(net).cast_matrices(torch.bfloat16)
    assert half.fc.weight.dtype == half.head_weight.dtype == torch.bfloat16
    assert half.embed_weight.dtype == torch.float32 and all(
        p.dtype == torch.float32 for n, p in half.named_parameters() if "norm" in n or n.endswith("bias"))
    tokens, feats = torch.tensor([[5, 6, 7]]), torch.randn(1, 3, 64)
    with torch.inference_mode():
        hidden, kv = half(tokens, feats, torch.arange(3)[None])
        ref, _ = net(tokens, feats, torch.arange(3)[None])
        assert hidden.dtype == kv[0].dtype == torch.float32                  # activations and KV stay fp32
        diff = half.logits(hidden) - net.logits(ref)                      # [1, 3, V]
        assert diff.norm() < 0.02 * net.logits(ref).norm()                # bf16 rounding, not a different net
    drafter = EagleTreeDrafter(half, total_tokens=8, depth=3, top_k=3)
    assert drafter.kv.keys.dtype == torch.float32
    assert_drafter_lossless(hf, target, drafter, batch, seed=2)


def test_draft_weight_option(monkeypatch):
    from drafters import registry
    from kernels import linear as linear_module

    cpu32, cpu16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert registry.draft_weight_dtype("float32", cpu16) == torch.float32
    assert registry.draft_weight_dtype("bfloat16", cpu32) == torch.bfloat16
    monkeypatch.setattr(linear_module, "bf16_supported", lambda: True)
    assert registry.draft_weight_dtype("auto", cpu32) == torch.bfloat16
    assert registry.draft_weight_dtype("auto", cpu16) == torch.bfloat16     # the target's own dtype
    assert registry.draft_weight_dtype("auto", torch.zeros(1, dtype=torch.float16)) == torch.float16
    monkeypatch.setattr(linear_module, "bf16_supported", lambda: False)
    assert registry.draft_weight_dtype("auto", cpu32) == torch.float32


def test_head_vocab_override_uses_shipped_frequencies(tiny_eagle, tmp_path):
    from drafters.eagle_model import FREQ_FILE, load_checkpoint, save_checkpoint

    _, target, net = tiny_eagle
    save_checkpoint(tmp_path, net, net.config)
    counts = torch.zeros(211, dtype=torch.long)
    counts[[7, 3, 150, 42, 9]] = torch.tensor([50, 40, 30, 20, 10])
    torch.save(counts, tmp_path / FREQ_FILE)
    top3 = load_checkpoint(tmp_path, target.embed_tokens, target.lm_head, head_vocab=3)
    assert top3.head_token_ids.tolist() == [3, 7, 150]
    assert top3.logits(torch.randn(2, 64)).shape == (2, 3)
    full = load_checkpoint(tmp_path, target.embed_tokens, target.lm_head, head_vocab=0)
    assert full.head_token_ids is None and full.logits(torch.randn(1, 64)).shape == (1, 211)
