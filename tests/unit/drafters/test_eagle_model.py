"""EAGLE drafter network, checkpoints, feature extraction and a few training steps (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from drafters.eagle_model import EagleConfig, EagleDrafter, load_checkpoint, save_checkpoint
from drafters.train.eagle import TrainConfig, train_eagle
from tests.helpers import ChatByteTokenizer, tiny_features, tiny_hf_config, word_records

VOCAB, HIDDEN = 260, 64


def target_cfg() -> dict:
    return tiny_hf_config(vocab_size=VOCAB)


def make_drafter(seed: int = 0, head_ids: torch.Tensor | None = None) -> tuple[EagleDrafter, torch.Tensor]:
    torch.manual_seed(seed)
    embed = torch.randn(VOCAB, HIDDEN)
    drafter = EagleDrafter(EagleConfig.from_target(target_cfg()), embed, embed, head_ids).eval()
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0, 0.2)
    return drafter, embed


def inputs(batch: int, length: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, length), generator=g)                # [B, T]
    feats = torch.randn(batch, length, HIDDEN, generator=g)                        # [B, T, H]
    return tokens, feats, torch.arange(length).expand(batch, length)


def test_shapes_and_config_round_trip():
    drafter, _ = make_drafter()
    tokens, feats, pos = inputs(2, 5)
    hidden, (k, v) = drafter(tokens, feats, pos)
    assert hidden.shape == (2, 5, HIDDEN) and k.shape == v.shape == (2, 2, 5, 16)
    assert drafter.logits(hidden).shape == (2, 5, VOCAB)
    cfg = drafter.config
    assert EagleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg and cfg.num_hidden_layers == 1
    assert not hasattr(drafter.layers[0].input_layernorm, "weight")


@torch.no_grad()
def test_causal_forward_equals_incremental_with_past():
    drafter = make_drafter()[0].double()
    tokens, feats, pos = inputs(2, 7)
    full, (k_full, _) = drafter(tokens, feats, pos)
    past, outs = None, []
    for t in range(7):
        out, past = drafter(tokens[:, t:t + 1], feats[:, t:t + 1], pos[:, t:t + 1], past)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(past[0], k_full, atol=1e-5, rtol=1e-5)
    head, past = drafter(tokens[:, :3], feats[:, :3], pos[:, :3])                # chunked: 3 + 4
    tail, _ = drafter(tokens[:, 3:], feats[:, 3:], pos[:, 3:], past)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tree_mask_forward_equals_each_path():
    drafter = make_drafter()[0].double()
    tokens, feats, pos = inputs(1, 4)
    _, past = drafter(tokens, feats.double(), pos)                                 # context of 4 pairs
    parents = [-1, -1, 0, 0, 2, 1]                                                 # parent-before-child
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    n = len(parents)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
    t_tokens, t_feats, _ = inputs(1, n, seed=2)
    mask = torch.cat([torch.ones(n, 4, dtype=torch.bool), anc], 1)[None, None]   # [1, 1, n, 4 + n]
    tree_out, _ = drafter(t_tokens, t_feats, 4 + torch.tensor([depth]), past, mask)
    for leaf in range(n):
        path = [j for j in range(n) if anc[leaf, j]]                               # ancestors ascending
        positions = 4 + torch.tensor([[depth[j] for j in path]])
        out, _ = drafter(t_tokens[:, path], t_feats[:, path], positions, past)
        torch.testing.assert_close(out[0, -1], tree_out[0, leaf], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    ids = torch.tensor([3, 10, 65, 97, 200])
    drafter, embed = make_drafter(head_ids=ids)
    save_checkpoint(tmp_path, drafter, drafter.config, {"note": "x"})
    names = set(load_file(str(tmp_path / "model.safetensors")))
    expected = {"fc.weight", "fc.bias", "layers.0.post_attention_layernorm.weight", "head_token_ids"}
    expected |= {f"layers.0.self_attn.{n}_proj.weight" for n in "qkvo"}
    expected |= {f"layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert names == expected
    loaded = load_checkpoint(tmp_path, torch.nn.Embedding.from_pretrained(embed), embed)
    assert json.loads((tmp_path / "config.json").read_text())["treespec"] == {"note": "x"}
    torch.testing.assert_close(loaded.head_token_ids, ids)
    tokens, feats, pos = inputs(2, 6)
    torch.testing.assert_close(loaded(tokens, feats, pos)[0], drafter(tokens, feats, pos)[0])


def _hf_reference(raw: dict, cfg: dict, embed: torch.Tensor, tokens, feats, pos) -> torch.Tensor:
    """Independent forward: transformers' LlamaDecoderLayer with layer 0's input norm removed."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("bias", "model_type")},
                         attn_implementation="eager")
    layer = LlamaDecoderLayer(hf_cfg, 0)
    layer.load_state_dict({k[len("layers.0."):]: v for k, v in raw.items() if k.startswith("layers.0.")},
                          strict=False)
    layer.input_layernorm = torch.nn.Identity()
    x = torch.nn.functional.linear(torch.cat([embed[tokens], feats], -1), raw["fc.weight"], raw["fc.bias"])
    t = tokens.shape[1]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    rope = LlamaRotaryEmbedding(hf_cfg)(x, pos)
    return layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)


@torch.no_grad()
def test_load_safeailab_layout(tmp_path):
    torch.manual_seed(3)
    cfg = {**target_cfg(), "num_hidden_layers": 1, "bias": True, "hidden_act": "silu"}
    h, q, kv, inter = HIDDEN, 4 * 16, 2 * 16, cfg["intermediate_size"]
    shapes = {"fc.weight": (h, 2 * h), "fc.bias": (h,), "layers.0.self_attn.q_proj.weight": (q, h),
              "layers.0.self_attn.k_proj.weight": (kv, h), "layers.0.self_attn.v_proj.weight": (kv, h),
              "layers.0.self_attn.o_proj.weight": (h, q), "layers.0.post_attention_layernorm.weight": (h,),
              "layers.0.mlp.gate_proj.weight": (inter, h), "layers.0.mlp.up_proj.weight": (inter, h),
              "layers.0.mlp.down_proj.weight": (h, inter), "embed_tokens.weight": (VOCAB, h)}
    raw = {k: torch.randn(s) * 0.2 for k, s in shapes.items()}
    torch.save(raw, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    target_embed = torch.randn(VOCAB, HIDDEN)
    drafter = load_checkpoint(tmp_path, target_embed, target_embed)
    assert torch.equal(drafter.embed_weight, target_embed)
    tokens, feats, pos = inputs(1, 6)
    want = _hf_reference(raw, cfg, target_embed, tokens, feats, pos)
    torch.testing.assert_close(drafter(tokens, feats, pos)[0], want, atol=1e-5, rtol=1e-4)


def test_truncated_head_maps_to_target_ids():
    ids = torch.tensor([2, 7, 50, 120, 259])
    drafter, embed = make_drafter(head_ids=ids)
    hidden = torch.randn(3, HIDDEN)
    logits = drafter.logits(hidden)                                                # [3, K]
    torch.testing.assert_close(logits, hidden @ embed[ids].T)
    best = logits.argmax(-1)
    assert torch.equal(drafter.to_target_ids(best), ids[best])


def _features(tmp_path, records, shard_size: int):
    return tiny_features(tmp_path, records, shard_size, target_cfg())


def test_features_shards(tmp_path):
    records = word_records(3)
    _, meta = _features(tmp_path, records, shard_size=2)
    assert meta["complete"] and meta["num_shards"] == 2
    shard = torch.load(tmp_path / "shard_00000.pt", weights_only=True)
    tok = ChatByteTokenizer()
    lengths = [min(48, len(tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]))))
        for r in records[:2]]
    n = sum(lengths)
    assert shard["input_ids"].dtype == torch.int32 and shard["input_ids"].shape == (n,)
    assert shard["features"].dtype == torch.float16 and shard["features"].shape == (n, HIDDEN)
    assert shard["loss_mask"].shape == (n,) and 0 < int(shard["loss_mask"].sum()) < n
    assert shard["offsets"].tolist() == [0, lengths[0], n] and shard["record_ids"] == ["r0", "r1"]
    first = shard["loss_mask"][:lengths[0]]
    assert not first[0] and first[-1]                                              # prompt, then assistant
    freq = torch.load(tmp_path / "token_freq.pt", weights_only=True)
    assert freq.shape == (VOCAB,) and int(freq.sum()) == meta["assistant_tokens"]
    stamp = (tmp_path / "shard_00001.pt").stat().st_mtime_ns
    _features(tmp_path, records, shard_size=2)                                     # resume: nothing to redo
    assert (tmp_path / "shard_00001.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError):
        _features(tmp_path, records, shard_size=3)


def test_training_reduces_loss_and_resumes(tmp_path):
    model, _ = _features(tmp_path / "work", word_records(12), shard_size=4)
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), lr=3e-3, batch_size=4,
                      epochs=20, warmup=2, head_vocab=64, log_every=1, save_every=50, seed=0)
    summary = train_eagle(cfg, target_cfg(), embed, embed)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert summary["steps"] == 40 and summary["head_vocab"] == 64 and summary["held_out"]["tokens"] > 0
    first, last = ({k: sum(r[k] for r in rows) / 4 for k in ("loss", "vloss", "acc")}
                   for rows in (log[:4], log[-4:]))
    assert last["loss"] < first["loss"] and last["vloss"] < 0.25 * first["vloss"]
    assert last["acc"] > first["acc"] + 0.3
    assert (tmp_path / "out" / "loss_curve.png").is_file()
    loaded = load_checkpoint(tmp_path / "out", embed, embed)
    assert loaded.head_token_ids.shape == (64,)
    more = TrainConfig(**{**cfg.__dict__, "epochs": 22, "resume": True})
    resumed = train_eagle(more, target_cfg(), embed, embed, save_dtype=torch.float16)   # --save-dtype float16
    assert resumed["steps"] == 44
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved["fc.weight"].dtype == torch.float16 and saved["head_token_ids"].dtype == torch.int64
    assert load_checkpoint(tmp_path / "out", embed, embed).fc.weight.dtype == torch.float32
