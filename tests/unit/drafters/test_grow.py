"""Deepening an EAGLE drafter (``--eagle-layers`` with a shallower ``--init``) keeps its function, then trains."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from drafters.eagle_model import EagleConfig, EagleDrafter, _eagle_state, load_checkpoint, own_state
from drafters.train.eagle import TrainConfig, deepened, train_eagle
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
