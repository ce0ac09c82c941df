"""Growing an EAGLE drafter (``--eagle-layers`` / ``--eagle-intermediate`` beyond its ``--init``'s) keeps its
function, then trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from drafters.eagle_model import EagleConfig, EagleDrafter, _eagle_state, load_checkpoint, own_state
from drafters.train.eagle import TrainConfig, deepened, drafter_shape, train_eagle, widened
from tests.helpers import tiny_features, word_records
from tests.unit.drafters.test_eagle_model import inputs, make_drafter, target_cfg


@torch.no_grad()
def test_deepened_drafter_drafts_as_the_shallow_one():
    shallow, embed = make_drafter()
    state = deepened(_eagle_state(shallow), 3)
    deep = EagleDrafter(EagleConfig.from_target(target_cfg(), 3), embed, embed).eval()
    deep.load_state_dict(own_state(state, 3))
    tokens, feats, pos = inputs(2, 6)
    want, _ = shallow(tokens, feats, pos)
    got, (keys, _) = deep(tokens, feats, pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert keys.shape[1] == 3 * 2                                  # every layer's KV heads are cached
    assert not deep.layers[2].mlp.down_proj.weight.any()
    torch.testing.assert_close(deep.layers[2].self_attn.qkv_proj.weight, shallow.layers[0].self_attn.qkv_proj.weight)
    assert deepened(state, 2) == state                     # never shrinks


def test_deepened_init_trains_its_new_layer(tmp_path):
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, target_cfg())
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "one"), lr=3e-3, batch_size=4, epochs=6,
                      warmup=2, log_every=1, save_every=50, seed=0)
    train_eagle(cfg, target_cfg(), embed, embed)
    deep = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "two"), "epochs": 3, "init": cfg.out, "layers": 2})
    train_eagle(deep, target_cfg(), embed, embed)
    one = json.loads((tmp_path / "one" / "train_log.json").read_text())["log"]
    two = json.loads((tmp_path / "two" / "train_log.json").read_text())["log"]
    assert abs(two[0]["loss"] - one[-1]["loss"]) < abs(two[0]["loss"] - one[0]["loss"])   # starts where one ended
    saved = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert saved["layers.1.mlp.down_proj.weight"].abs().sum() > 0                        # the new layer learned
    assert load_checkpoint(tmp_path / "two", embed, embed).config.num_hidden_layers == 2


@torch.no_grad()
def test_widened_drafter_drafts_as_the_narrow_one():
    narrow, embed = make_drafter()
    width = narrow.config.intermediate_size
    state = widened(deepened(_eagle_state(narrow), 2), 3 * width)
    wide = EagleDrafter(EagleConfig.from_target(target_cfg(), 2, intermediate_size=3 * width), embed, embed).eval()
    wide.load_state_dict(own_state(state, 2))
    tokens, feats, pos = inputs(2, 6)
    want, _ = narrow(tokens, feats, pos)
    got, _ = wide(tokens, feats, pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for layer in wide.layers:
        assert layer.mlp.gate_up_proj.weight.shape == (2 * 3 * width, target_cfg()["hidden_size"])
        assert layer.mlp.gate_up_proj.weight[width:3 * width].abs().sum() > 0        # new gate rows are drawn
        assert not layer.mlp.down_proj.weight[:, width:].any()
    assert widened(state, width) == state                                             # never narrows


def test_widened_init_trains_its_new_units(tmp_path):
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, target_cfg())
    embed = model.model.embed_tokens.weight.detach()
    width = target_cfg()["intermediate_size"]
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "one"), lr=3e-3, batch_size=4, epochs=4,
                      warmup=2, log_every=1, save_every=50, seed=0)
    train_eagle(cfg, target_cfg(), embed, embed)
    wide = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "two"), "epochs": 2, "init": cfg.out,
                          "intermediate": 2 * width})
    train_eagle(wide, target_cfg(), embed, embed)
    saved = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert saved["layers.0.mlp.down_proj.weight"][:, width:].abs().sum() > 0                # the new units learned
    loaded = load_checkpoint(tmp_path / "two", embed, embed)
    assert loaded.config.intermediate_size == 2 * width
    assert json.loads((tmp_path / "two" / "config.json").read_text())["intermediate_size"] == 2 * width
    again = TrainConfig(**{**wide.__dict__, "out": str(tmp_path / "three"), "init": wide.out, "intermediate": None})
    assert drafter_shape(again) == (1, 2 * width)                                     # the init's shape by default
    with pytest.raises(ValueError, match="only grows"):
        train_eagle(TrainConfig(**{**again.__dict__, "intermediate": width}), target_cfg(), embed, embed)
