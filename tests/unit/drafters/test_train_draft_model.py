"""``train-drafter --method draft-model`` on a tiny target: token ids only, a loadable head-less checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import hf_model_from, tiny_hf_config, write_shard

from drafters.draft_model_load import load_draft_model
from drafters.train.draft_model import chain_rates, train_draft_model


def test_chain_rates_count_runs_of_hits():
    hits = [torch.tensor([True, True, False, True]), torch.tensor([True])]
    assert chain_rates(hits, 3) == [4 / 5, 1 / 5, 0.0]


def test_training_learns_a_repeating_answer_and_saves_a_loadable_checkpoint(tmp_path: Path, tiny_pair):
    """Answers that cycle 10, 11, 12: a few steps of fresh layers learn them (held-out top-1 rises) and the
    checkpoint, without embedding or head, loads onto the target's."""
    cfg = tiny_hf_config()
    state = hf_model_from(cfg).state_dict()
    cycle = [10 + i % 3 for i in range(24)]
    for s in range(3):
        write_shard(tmp_path / f"shard_{s:05d}.npz", [([5 + s, 6, 7], cycle) for _ in range(4)])
    out = tmp_path / "ckpt"
    summary = train_draft_model(tmp_path, out, cfg, state, init="fresh", layers=1, lr=3e-3, batch_tokens=128,
                                max_len=64, max_minutes=2, epochs=15, warmup=2, save_dtype=torch.float32)
    assert summary["held_out"]["top1"] > 0.9 > summary["held_out_before"]["top1"]
    assert summary["held_out"]["chain"][2] > 0.8 and summary["held_out_records"] == 4
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["treespec"]["method"] == "draft-model"
    _, target = tiny_pair
    model = load_draft_model(out, target)
    assert model.embed_tokens.weight is target.embed_tokens.weight
