"""Gumiho: network and checkpoint layout, tree structure, faithful MLP pairing, losslessness, training."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_batched_drafts_equal_solo,
    assert_drafter_lossless,
    feed_random_context,
    tiny_features,
    tiny_gumiho_net,
    tiny_hf_config,
    word_records,
)

from drafters.base import DraftRequest
from drafters.gumiho import GumihoTreeDrafter
from drafters.gumiho_model import GumihoConfig, GumihoDrafter, load_gumiho_checkpoint, save_gumiho_checkpoint
from drafters.train.gumiho import train_gumiho
from drafters.train.loop import TrainConfig
from server.engine.request import SamplingParams

FULL = 10**6

HIDDEN = 64


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    hf, target = tiny_pair
    return hf, target, tiny_gumiho_net(target)


def test_mlp_heads_zero_initialised_and_shapes(tiny_pair):
    _, target = tiny_pair
    cfg = GumihoConfig.from_dict(tiny_hf_config(), mlp_num=3, mlp_res_blocks=2)
    net = GumihoDrafter(cfg, target.embed_tokens.weight, target.lm_head.weight)
    assert cfg.num_hidden_layers == 2 and len(net.layers) == 2
    for head in net.mlp.mlp:
        assert all(not block.linear.weight.detach().any() for block in head)
    tok = torch.tensor([[1, 2]])
    out = net.parallel(tok, torch.randn(1, 2, HIDDEN), tok + 1, torch.randn(1, 2, HIDDEN))
    assert out.shape == (1, 2, 3, HIDDEN)


@pytest.mark.parametrize(("depth", "k", "pruning"), [(6, 3, 4), (3, 2, 5), (8, 3, 4), (1, 3, 4)])
def test_pool_structure(tiny, depth, k, pruning):
    _, _, net = tiny
    d = GumihoTreeDrafter(net, total_tokens=12, depth=depth, top_k=k, mlp_top_k=pruning, pruning=pruning)
    feed_random_context(d, "a", [5, 6, 7, 8, 9])
    steps, mlp_depths = d.split(depth)
    assert steps + mlp_depths == depth and steps >= 1 and mlp_depths == min(5, depth - 1)
    pool = d.draft(["a"], k, depth, [FULL])                                 # no early stop: the whole pool
    assert pool.tokens.shape == (1, k + k * steps + mlp_depths * pruning)    # survivors only, then pruning
    parents = pool.parents[0].tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents))
    node_depth = []
    for p in parents:
        node_depth.append(1 if p < 0 else node_depth[p] + 1)
    serial_nodes = k + k * steps
    assert max(node_depth[:serial_nodes]) == 1 + steps                      # serial tokens: depth - mlp_num + 1
    assert max(node_depth) == depth + 1                                      # e.g. 2 serial + 5 MLP = 7
    scores = pool.scores[0]
    assert all(scores[i] <= scores[p] + 1e-6 for i, p in enumerate(parents) if p >= 0)
    tree = d.propose([DraftRequest("a", [5, 6, 7, 8, 9], SamplingParams(), budget=12)])[0]
    assert len(tree) == min(12, pool.tokens.shape[1]) and tree.max_depth <= depth + 1
    assert all(p < i for i, p in enumerate(tree.parents))                    # ancestor-closed, ordered


def test_mlp_input_pairs_each_beam_with_its_own_parent(tiny_pair, monkeypatch):
    """The faithful pairing: beam b's MLP input holds b's parent's token and b's own token/feature."""
    net = tiny_gumiho_net(tiny_pair[1], seed=0, std=0.1)      # flat enough that survivors' parents are out of rank order
    d = GumihoTreeDrafter(net, total_tokens=12, depth=6, top_k=4)
    feed_random_context(d, "a", [5, 6, 7, 8, 9, 10])
    seen = {}
    original = net.mlp_input

    def spy(tok_a, h_a, tok_b, h_b):
        seen.update(tok_a=tok_a.clone(), tok_b=tok_b.clone())
        return original(tok_a, h_a, tok_b, h_b)

    monkeypatch.setattr(net, "mlp_input", spy)
    pool = d.draft(["a"], 4, 6, [FULL])
    tokens, parents = pool.tokens[0].tolist(), pool.parents[0].tolist()
    beams = range(4, 8)                                                      # depth-2 survivors
    assert seen["tok_b"][0].tolist() == [tokens[b] for b in beams]
    assert seen["tok_a"][0].tolist() == [tokens[parents[b]] for b in beams]
    assert [parents[b] for b in beams] != [0, 1, 2, 3]     # rank-order pairing (the released code's) would differ


def test_batched_expansion_equals_one_by_one(tiny):
    _, _, net = tiny
    contexts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    assert_batched_drafts_equal_solo(
        lambda: GumihoTreeDrafter(net, total_tokens=12, depth=6, top_k=3, mlp_top_k=4, pruning=4), contexts, 12)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8])
def test_random_gumiho_drafter_is_lossless(tiny, batch, weights):
    import copy

    hf, target, net = tiny
    net = copy.deepcopy(net).cast_matrices(weights)                     # bf16: the MLP heads' matrices too
    assert all(m.linear.weight.dtype == weights for m in net.modules() if hasattr(m, "linear"))
    drafter = GumihoTreeDrafter(net, total_tokens=10, depth=6, top_k=3, mlp_top_k=3, pruning=3)
    assert_drafter_lossless(hf, target, drafter, batch, seed=3)


def test_checkpoint_round_trip(tiny, tmp_path):
    _, target, net = tiny
    save_gumiho_checkpoint(tmp_path, net, {"note": "x"}, dtype=torch.float16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["mlp_num"] == 5 and cfg["treespec"] == {"note": "x"}
    loaded = load_gumiho_checkpoint(tmp_path, target.embed_tokens, target.lm_head)
    assert loaded.config == net.config and loaded.fc.weight.dtype == torch.float32
    tok = torch.tensor([[7, 9]])
    h = torch.randn(1, 2, HIDDEN)
    torch.testing.assert_close(loaded.parallel(tok, h, tok + 1, h), net.parallel(tok, h, tok + 1, h),
                               atol=5e-2, rtol=5e-2)                         # fp16 storage


def test_load_amd_gumiho_layout(tiny_pair, tmp_path):
    """A checkpoint written with Gumiho's own names (``cnets.py``): separate q/k/v and gate/up, ``mlp.mlp.i.j``,
    an ``embed_tokens`` copy, pytorch_model.bin; mlp_num / block count only in the weight names."""
    _, target = tiny_pair
    g = torch.Generator().manual_seed(0)
    h, inter, kv = HIDDEN, tiny_hf_config()["intermediate_size"], 2 * 16
    sd = {"fc.weight": torch.randn(h, 2 * h, generator=g), "fc.bias": torch.randn(h, generator=g),
          "embed_tokens.weight": torch.randn(211, h, generator=g)}
    for i in range(2):
        p = f"layers.{i}."
        shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
                  "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
                  "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
                  "mlp.down_proj.weight": (h, inter), "post_attention_layernorm.weight": (h,)}
        if i:
            shapes["input_layernorm.weight"] = (h,)
        sd.update({p + n: torch.randn(*s, generator=g) * 0.1 for n, s in shapes.items()})
    for i in range(3):
        for j in range(3):
            width = 2 * h if j == 0 else h
            sd[f"mlp.mlp.{i}.{j}.linear.weight"] = torch.randn(h, width, generator=g) * 0.1
            sd[f"mlp.mlp.{i}.{j}.linear.bias"] = torch.randn(h, generator=g) * 0.1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({**tiny_hf_config(), "num_hidden_layers": 2, "bias": True}))
    net = load_gumiho_checkpoint(tmp_path, target.embed_tokens, target.lm_head)
    assert net.config.mlp_num == 3 and net.config.mlp_res_blocks == 2
    tok_a, tok_b = torch.tensor([4]), torch.tensor([9])
    h_a, h_b = torch.randn(1, h, generator=g), torch.randn(1, h, generator=g)
    emb = target.embed_tokens.weight

    def fuse(tok, feat):
        return torch.cat([emb[tok], feat], -1) @ sd["fc.weight"].T + sd["fc.bias"]

    x = torch.cat([fuse(tok_a, h_a), fuse(tok_b, h_b)], -1)
    silu = torch.nn.functional.silu
    for i in range(3):
        y = silu(x @ sd[f"mlp.mlp.{i}.0.linear.weight"].T + sd[f"mlp.mlp.{i}.0.linear.bias"])
        for j in (1, 2):
            y = y + silu(y @ sd[f"mlp.mlp.{i}.{j}.linear.weight"].T + sd[f"mlp.mlp.{i}.{j}.linear.bias"])
        torch.testing.assert_close(net.parallel(tok_a, h_a, tok_b, h_b)[:, i], y, atol=1e-5, rtol=1e-5)


def test_gumiho_training_reduces_loss_and_resumes(tmp_path):
    cfg_target = tiny_hf_config(vocab_size=260)
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, cfg_target)
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), lr=3e-3, batch_size=4, epochs=20,
                      warmup=2, head_vocab=64, log_every=1, save_every=50, seed=0, mlp_num=3, mlp_res_blocks=1)
    summary = train_gumiho(cfg, cfg_target, embed, embed)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert summary["steps"] == 40 and summary["held_out"]["tokens"] > 0
    first, last = ({k: sum(r[k] for r in rows) / 4 for k in ("vloss", "acc", "vloss_mlp0")}
                   for rows in (log[:4], log[-4:]))
    assert last["vloss"] < 0.5 * first["vloss"] and last["acc"] > first["acc"] + 0.3
    assert last["vloss_mlp0"] < 0.5 * first["vloss_mlp0"]
    assert "acc_mlp0" not in log[0] and "acc_mlp0" in log[-1]               # MLP CE from epoch 2 on
    assert {"acc_mlp0", "acc_mlp2"} <= summary["held_out"].keys()
    loaded = load_gumiho_checkpoint(tmp_path / "out", embed, embed)
    assert loaded.config.mlp_num == 3 and loaded.head_token_ids.shape == (64,)
    resumed = train_gumiho(TrainConfig(**{**cfg.__dict__, "epochs": 22, "resume": True}), cfg_target, embed, embed)
    assert resumed["steps"] == 44
