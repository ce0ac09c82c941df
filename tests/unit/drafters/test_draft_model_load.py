"""Loading draft models (GGUF, head-less safetensors checkpoints), the tokenizer check and the registry entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from helpers import native_from, tiny_hf_config
from safetensors.torch import save_file
from unit.models.test_loader import random_hf_state, write_llama_gguf

from drafters.base import DraftRequest
from drafters.draft_model import DraftModelDrafter
from drafters.draft_model_load import check_tokenizers, load_draft_model
from drafters.registry import build_drafter
from drafters.train.draft_model import save_draft_model
from server.config import ServerConfig
from server.engine.request import SamplingParams


def draft_state(layers: int = 1) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = tiny_hf_config(num_hidden_layers=layers)
    return cfg, {k: torch.from_numpy(v) for k, v in random_hf_state(cfg, bias=False, lm_head=False).items()}


def trees(model, tokens: list[int]):
    d = DraftModelDrafter.create(model, 256, 8, 3, 3)
    return d.propose([DraftRequest("r", tokens, SamplingParams(), 8)])[0]


def test_gguf_draft_model_drafts_like_its_weights(tmp_path: Path, tiny_pair):
    _, target = tiny_pair
    cfg, state = draft_state()
    path = tmp_path / "draft.gguf"
    write_llama_gguf(path, cfg, {k: v.numpy() for k, v in state.items()}, gguf.GGMLQuantizationType.F32)
    model = load_draft_model(path, target)
    assert model.config.num_hidden_layers == 1
    want = trees(native_from(cfg, state), [9, 4, 77, 31, 5])
    got = trees(model, [9, 4, 77, 31, 5])
    assert (got.tokens, got.parents) == (want.tokens, want.parents)


def test_headless_checkpoint_reads_the_targets_embedding_and_head(tmp_path: Path, tiny_pair):
    _, target = tiny_pair
    cfg, state = draft_state(layers=2)
    full = native_from(cfg, {**state, "model.embed_tokens.weight": target.embed_tokens.weight.detach()})
    save_draft_model(tmp_path / "ckpt", full, cfg, {}, torch.float32)
    assert set(json.loads((tmp_path / "ckpt" / "config.json").read_text())["treespec"]["shares_target"]) == {
        "embed_tokens.weight", "lm_head.weight"}
    model = load_draft_model(tmp_path / "ckpt", target)
    assert model.embed_tokens.weight is target.embed_tokens.weight
    assert model.lm_head.weight is target.lm_head.weight
    got, want = trees(model, [3, 14, 15, 92]), trees(full, [3, 14, 15, 92])
    assert (got.tokens, got.parents) == (want.tokens, want.parents)


def test_own_embedding_without_tokenizer_is_refused(tmp_path: Path, tiny_pair):
    _, target = tiny_pair
    cfg, state = draft_state()
    (tmp_path / "d").mkdir()
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no tokenizer"):
        load_draft_model(tmp_path / "d", target, target_path=tmp_path / "target")


def tokenizer_copy(src: Path, dst: Path, swap: tuple[str, str] | None = None) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, dst / name)
    if swap:
        data = json.loads((dst / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        vocab[swap[0]], vocab[swap[1]] = vocab[swap[1]], vocab[swap[0]]
        (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_tokenizer_mismatch_names_both_paths(tmp_path: Path, default_model_dir: Path):
    check_tokenizers(tokenizer_copy(default_model_dir, tmp_path / "same"), default_model_dir)
    other = tokenizer_copy(default_model_dir, tmp_path / "other", swap=("hello", "world"))
    with pytest.raises(ValueError, match="different tokenizers") as err:
        check_tokenizers(other, default_model_dir)
    assert str(other) in str(err.value) and str(default_model_dir) in str(err.value)


def test_registry_builds_the_drafter_with_the_configs_options(tmp_path: Path, tiny_pair):
    _, target = tiny_pair
    cfg, state = draft_state()
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    (target_dir / "config.json").write_text(json.dumps(tiny_hf_config()))
    save_draft_model(tmp_path / "draft", native_from(cfg, {**state, "model.embed_tokens.weight":
                                                           target.embed_tokens.weight.detach()}), cfg, {})
    config = ServerConfig(model=str(target_dir), drafter="draft-model", drafter_path=str(tmp_path / "draft"),
                          num_kv_blocks=10, block_size=4, max_num_seqs=2,
                          draft_model={"depth": 2, "top_k": 3, "chunk": 16})
    drafter = build_drafter("draft-model", config, target)
    assert isinstance(drafter, DraftModelDrafter)
    assert drafter.tree_shape() == (2, 3) and drafter.chunk == 16
    assert drafter.kv.num_free == 10 * 4 + 2 * (2 * 3 + 1)
