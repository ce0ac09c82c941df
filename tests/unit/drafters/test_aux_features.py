"""EAGLE-3-style fused features: the target's ``--aux-layers`` are extracted beside the last hidden state, and
an EAGLE drafter grown to read them drafts as before until training teaches it to."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from drafters import registry
from drafters.base import DraftRequest
from drafters.eagle import EagleTreeDrafter
from drafters.eagle_model import EagleConfig, EagleDrafter, _eagle_state, load_checkpoint, own_state
from drafters.hybrid import HybridDrafter
from drafters.train.eagle import TrainConfig, fused, train_eagle
from drafters.train.features import (
    features_complete,
    run_key,
    shard_paths,
    stored_aux_layers,
    target_features,
)
from server.engine.request import SamplingParams
from tests.helpers import (
    assert_drafter_lossless,
    feed_random_context,
    native_from,
    reference_greedy,
    run_to_completion,
    tiny_eagle_net,
    tiny_engine,
    tiny_features,
    tiny_hf_config,
    word_records,
)
from tests.unit.drafters.test_eagle_model import HIDDEN, inputs, make_drafter, target_cfg

AUX = (0, 1)


def test_extraction_stores_the_aux_layers_outputs(tmp_path):
    model, meta = tiny_features(tmp_path / "work", word_records(6), 3, target_cfg(), AUX)
    assert meta["aux_layers"] == list(AUX) and stored_aux_layers(tmp_path / "work") == AUX
    shard = torch.load(shard_paths(tmp_path / "work")[0], weights_only=True)
    assert shard["aux"].shape == (len(shard["input_ids"]), len(AUX) * HIDDEN)
    first = shard["input_ids"][:int(shard["offsets"][1])].long()
    with torch.no_grad():
        states = model.model(input_ids=first[None], output_hidden_states=True).hidden_states
    want = torch.cat([states[i + 1][0] for i in AUX], -1)                                  # [n, k H]
    torch.testing.assert_close(shard["aux"][:len(first)].float(), want, atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(shard["features"][:len(first)].float(), states[-1][0], atol=2e-2, rtol=2e-3)
    assert target_features(model, [first.tolist()])[0].shape == (len(first), HIDDEN)       # none asked: last only


def test_a_drafter_without_aux_reuses_aux_features_and_the_reverse_is_refused(tmp_path):
    model, _ = tiny_features(tmp_path / "aux", word_records(4), 2, target_cfg(), AUX)
    tiny_features(tmp_path / "plain", word_records(4), 2, target_cfg())
    assert features_complete(tmp_path / "aux", run_key("tiny", "mem", None, 48, 0, 2))
    with pytest.raises(ValueError, match="another run"):
        features_complete(tmp_path / "plain", run_key("tiny", "mem", None, 48, 0, 2, AUX))
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "plain"), out=str(tmp_path / "out"), epochs=1, aux_layers=AUX)
    with pytest.raises(ValueError, match="--aux-layers"):
        train_eagle(cfg, target_cfg(), embed, embed)
    assert stored_aux_layers(tmp_path / "plain") == ()


@torch.no_grad()
def test_fused_drafter_drafts_as_the_plain_one_until_trained():
    plain, embed = make_drafter()
    grown = EagleDrafter(EagleConfig.from_target(target_cfg(), aux_layers=AUX), embed, embed).eval()
    grown.load_state_dict(own_state(fused(_eagle_state(plain), grown), 1))
    tokens, feats, pos = inputs(2, 6)
    aux = torch.randn(2, 6, len(AUX) * HIDDEN) * 30                                        # raw residual scale
    want, _ = plain(tokens, feats, pos)
    for given in (aux, None):
        got, _ = grown(tokens, feats, pos, aux=given)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    grown.aux_fc.weight.normal_(0, 0.2)
    moved, _ = grown(tokens, feats, pos, aux=aux)
    unread, _ = grown(tokens, feats, pos)
    assert not torch.allclose(moved, want, atol=1e-3)
    torch.testing.assert_close(unread, want, atol=1e-6, rtol=1e-6)                         # drafted: no aux
    scaled, _ = grown(tokens, feats, pos, aux=aux * 7)
    torch.testing.assert_close(scaled, moved, atol=1e-4, rtol=1e-4)                        # each layer RMS-normed


def test_training_with_aux_layers_learns_to_read_them_and_saves_them(tmp_path):
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, target_cfg(), AUX)
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "one"), lr=3e-3, batch_size=4, epochs=3,
                      warmup=2, log_every=1, save_every=50, seed=0, unroll=2)
    train_eagle(cfg, target_cfg(), embed, embed)
    assert "aux_fc.weight" not in load_file(str(tmp_path / "one" / "model.safetensors"))
    grown = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "two"), "init": cfg.out, "aux_layers": AUX})
    train_eagle(grown, target_cfg(), embed, embed)
    one = json.loads((tmp_path / "one" / "train_log.json").read_text())["log"]
    two = json.loads((tmp_path / "two" / "train_log.json").read_text())["log"]
    assert abs(two[0]["loss"] - one[-1]["loss"]) < abs(two[0]["loss"] - one[0]["loss"])   # starts where one ended
    assert load_file(str(tmp_path / "two" / "model.safetensors"))["aux_fc.weight"].abs().sum() > 0
    loaded = load_checkpoint(tmp_path / "two", embed, embed)
    assert loaded.config.aux_layers == AUX and loaded.aux_fc.weight.abs().sum() > 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["aux_layers"] == list(AUX)
    serve = SimpleNamespace(drafter_path=str(tmp_path / "two"), draft_head_vocab=None, draft_weights="auto",
                            max_draft_tokens=8, draft_depth=None, draft_top_k=4)
    table = SimpleNamespace(weight=embed)
    assert registry._eagle(serve, SimpleNamespace(embed_tokens=table, lm_head=table)).aux_layers == AUX
    again = TrainConfig(**{**grown.__dict__, "out": str(tmp_path / "three"), "init": grown.out, "aux_layers": (),
                           "epochs": 1})
    train_eagle(again, target_cfg(), embed, embed)                                      # the init's layers by default
    assert json.loads((tmp_path / "three" / "config.json").read_text())["aux_layers"] == list(AUX)
    with pytest.raises(ValueError, match="reads target layers"):
        train_eagle(TrainConfig(**{**again.__dict__, "aux_layers": AUX[:1]}), target_cfg(), embed, embed)


class Recording(EagleTreeDrafter):
    """An EAGLE tree drafter that keeps every update the runner sends it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list = []

    def on_accept(self, updates):
        self.seen += updates
        super().on_accept(updates)


@pytest.fixture
def own_target(tiny_pair):
    """A native copy of the tiny target: the runner sets ``aux_layers`` on the model it serves."""
    hf, _ = tiny_pair
    return hf, native_from(tiny_hf_config(), hf.state_dict())


def test_the_runner_feeds_the_drafters_aux_layers(own_target):
    hf, target = own_target
    drafter = Recording(tiny_eagle_net(target, (0,)), total_tokens=6, depth=3, top_k=2)
    engine = tiny_engine(target, num_blocks=128, drafter=drafter)
    prompt = [5, 9, 14, 3, 77, 31, 8]
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0))
    got = run_to_completion(engine, {})["r"]
    assert got == reference_greedy(hf, prompt, 12)
    ids = prompt + got
    with torch.no_grad():
        states = hf.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    width = tiny_hf_config()["hidden_size"]
    for u in drafter.seen:
        rows = torch.arange(u.start, u.start + len(u.fed_tokens))
        if len(u.features) < len(rows):                               # verify: root + accepted nodes only
            rows = rows[:len(u.features)]
        assert u.features.shape[1] == 2 * width
        torch.testing.assert_close(u.features[:, :width], states[-1][0, rows], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(u.features[:, width:], states[1][0, rows], atol=1e-4, rtol=1e-4)
    assert target.aux_layers == (0,)
    tiny_engine(target, num_blocks=16)
    assert target.aux_layers == ()                                    # a runner without the drafter: none


@pytest.mark.parametrize("batch", [1, 6])
def test_an_aux_layer_drafter_is_lossless(own_target, batch):
    hf, target = own_target
    drafter = EagleTreeDrafter(tiny_eagle_net(target, (0, 1)), total_tokens=8, depth=3, top_k=3)
    assert_drafter_lossless(hf, target, drafter, batch, seed=3)
    hybrid = HybridDrafter(EagleTreeDrafter(tiny_eagle_net(target, (1,)), total_tokens=8, depth=3, top_k=3))
    assert hybrid.aux_layers == (1,)
    assert_drafter_lossless(hf, target, hybrid, batch, seed=5)


def test_a_drafter_given_rows_without_its_aux_layers_says_so(tiny_pair):
    _, target = tiny_pair
    drafter = EagleTreeDrafter(tiny_eagle_net(target, (0,)), total_tokens=6, depth=2, top_k=2)
    with pytest.raises(ValueError, match="target layers \\[0\\]"):
        feed_random_context(drafter, "a", [5, 6, 7, 8])
    with pytest.raises(ValueError, match="target has 2"):
        tiny_engine(native_from(tiny_hf_config(), tiny_pair[0].state_dict()), num_blocks=16,
                    drafter=EagleTreeDrafter(tiny_eagle_net(target, (2,)), total_tokens=6, depth=2, top_k=2))


def test_the_fixed_shape_context_pass_reads_aux_layers_as_the_dynamic_one(own_target):
    hf, target = own_target
    net = tiny_eagle_net(target, (0, 1))
    dynamic = EagleTreeDrafter(net, total_tokens=12, depth=4, top_k=3)
    static = EagleTreeDrafter(net, total_tokens=12, depth=4, top_k=3)
    static.enable_cuda_graphs(max_num_seqs=4, max_model_len=96, capture=False)
    contexts = {"a": [5, 9, 14, 3, 77, 21, 8], "b": [40, 2, 2, 19]}
    for d in (dynamic, static):
        for rid, toks in contexts.items():
            feed_random_context(d, rid, toks, hidden=3 * tiny_hf_config()["hidden_size"])
    asks = [DraftRequest(rid, toks, SamplingParams(), 12) for rid, toks in contexts.items()]
    for got, want in zip(static.propose(asks), dynamic.propose(asks)):
        assert got.tokens == want.tokens and got.parents == want.parents
    assert static.static_context.graphs                                  # the fixed-shape pass ran
    static = EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3)
    static.enable_cuda_graphs(max_num_seqs=8, max_model_len=512, capture=False)
    assert_drafter_lossless(hf, target, static, 3, seed=7)
