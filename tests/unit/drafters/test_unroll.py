"""The drafter unrolled on its own features equals step-by-step drafting; depth metrics and unrolled training."""

from __future__ import annotations

import json

import torch

from drafters.train.eagle import EagleRecipe, TrainConfig, train_eagle
from drafters.train.unroll import shift, unroll_mask, unrolled
from tests.helpers import tiny_features, word_records
from tests.unit.drafters.test_eagle_model import inputs, make_drafter, target_cfg


def test_unroll_mask():
    m = unroll_mask(3, 2, "cpu")
    assert m.shape == (3, 9)
    assert m[:, :3].tolist() == torch.ones(3, 3, dtype=torch.bool).tril().tolist()
    assert m[:, 3:6].tolist() == m[:, 6:].tolist() == torch.eye(3, dtype=torch.bool).tolist()


@torch.no_grad()
def test_unrolled_steps_equal_incremental_drafting():
    drafter = make_drafter()[0].double()
    tokens, feats, pos = inputs(2, 8)
    feats = feats.double()
    preds = unrolled(drafter, tokens, feats, pos, steps=3)
    for start in (0, 3, 5):
        out, past = drafter(tokens[:, :start + 1], feats[:, :start + 1], pos[:, :start + 1])   # context
        want = [out[:, -1]]
        for j in (1, 2):                                   # own feature, next true token, next position
            out, past = drafter(tokens[:, start + j:start + j + 1], want[-1][:, None], pos[:, start + j:start + j + 1],
                                past)
            want.append(out[:, -1])
        for j in range(3):
            torch.testing.assert_close(preds[j][:, start], want[j], atol=1e-6, rtol=1e-6)


def test_shift():
    x = torch.arange(6).view(1, 6)
    assert shift(x, 2).tolist() == [[2, 3, 4, 5, 0, 0]] and shift(x, 0) is x


def test_unrolled_training_and_depth_metrics(tmp_path):
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, target_cfg())
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), lr=3e-3, batch_size=4, epochs=6,
                      warmup=2, log_every=1, save_every=50, seed=0, unroll=3)
    summary = train_eagle(cfg, target_cfg(), embed, embed)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert {"acc_d2", "acc_d3"} <= set(log[-1]) and summary["steps"] == 12
    assert log[-1]["loss"] < log[0]["loss"]
    warm = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "warm"), "epochs": 1, "init": cfg.out})
    train_eagle(warm, target_cfg(), embed, embed)                 # warm start from the checkpoint just saved
    warm_log = json.loads((tmp_path / "warm" / "train_log.json").read_text())["log"]
    assert warm_log[0]["loss"] < log[0]["loss"] - 0.01
    drafter = make_drafter()[0]
    tokens, feats, pos = inputs(2, 6)
    batch = {"tokens": tokens, "features": feats, "positions": pos, "targets": torch.roll(feats, -1, 1),
             "mask": torch.ones(2, 6)}
    depth = EagleRecipe().top1_by_depth(drafter, batch, embed, 4)
    assert [n for _, n in depth] == [12, 10, 8, 6] and all(0 <= h <= n for h, n in depth)
