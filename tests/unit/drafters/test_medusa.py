"""Medusa drafter: heads and checkpoints (own and FasterDecoding layouts), losslessness, batching, training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    assert_batched_drafts_equal_solo,
    assert_drafter_lossless,
    chi2_pvalue,
    feed_random_context,
    tiny_engine,
    tiny_features,
    tiny_hf_config,
    word_records,
)

from drafters.base import DraftRequest
from drafters.medusa import MedusaDrafter
from drafters.medusa_config import MedusaConfig
from drafters.medusa_model import MedusaHeads, MedusaHeadsSpec, load_medusa, save_medusa
from drafters.medusa_tree import STATIC_TREE_FILE, load_static_tree, static_paths
from drafters.train.loop import TrainConfig
from drafters.train.medusa import MedusaRecipe, train_medusa
from server.engine.request import SamplingParams

HIDDEN, VOCAB = 64, 211
STATIC = [(0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1), (0, 0, 0, 0)]


def make_heads(lm_head: torch.Tensor, num_heads: int = 4, trained: bool = False, ids=None, seed: int = 3,
               std: float = 0.3) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaHeadsSpec(HIDDEN, VOCAB, num_heads, 2, trained), lm_head, ids).eval()
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, std)
    return heads


@pytest.fixture(scope="module")
def heads(tiny_pair):
    return make_heads(tiny_pair[1].lm_head.weight)


def test_untrained_heads_are_the_identity_before_the_lm_head(tiny_pair):
    lm = tiny_pair[1].lm_head.weight
    heads = MedusaHeads(MedusaHeadsSpec(HIDDEN, VOCAB, 3, 2), lm)
    assert all(not block.linear.weight.detach().any() for seq in heads.blocks for block in seq)
    f = torch.randn(2, 5, HIDDEN)
    feats = heads(f)                                                              # [2, 5, 3, H]
    assert feats.shape == (2, 5, 3, HIDDEN)
    torch.testing.assert_close(feats, f[:, :, None].expand_as(feats))
    torch.testing.assert_close(heads.logits(feats), (f @ lm.T)[:, :, None].expand(2, 5, 3, VOCAB))


@pytest.mark.parametrize("trained", [False, True])
def test_checkpoint_round_trip(tiny_pair, tmp_path, trained):
    lm = tiny_pair[1].lm_head.weight
    ids = torch.tensor([2, 5, 7, 11, 13, 40, 100]) if trained else None
    net = make_heads(lm, trained=trained, ids=ids)
    save_medusa(tmp_path, net, {"note": "x"}, dtype=torch.float16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["medusa_num_heads"] == 4 and cfg["medusa_num_layers"] == 2 and cfg["treespec"] == {"note": "x"}
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    assert ("0.2.weight" in saved) == trained and ("head_token_ids" in saved) == trained   # frozen head: not saved
    assert all(v.dtype == torch.float16 for k, v in saved.items() if k != "head_token_ids")
    loaded = load_medusa(tmp_path, tiny_pair[1].lm_head)
    assert loaded.config == net.config and loaded.blocks[0][0].linear.weight.dtype == torch.float32
    f = torch.randn(3, HIDDEN)
    torch.testing.assert_close(loaded.logits(loaded(f)), net.logits(net(f)), atol=0.15, rtol=5e-2)   # fp16 storage
    if trained:
        assert loaded.to_target_ids(torch.tensor([0, 6])).tolist() == [2, 100]


@pytest.mark.parametrize("saved_trained", [False, True])
def test_warm_start_into_the_other_head_kind_is_an_error(tiny_pair, saved_trained):
    lm = tiny_pair[1].lm_head.weight
    state = make_heads(lm, trained=saved_trained).medusa_state()
    other = make_heads(lm, trained=not saved_trained)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="--medusa-head must match"):
        MedusaRecipe(num_layers=2, trained_head=not saved_trained).load_init(other, state)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    same = make_heads(lm, trained=saved_trained, seed=4)
    MedusaRecipe(num_layers=2, trained_head=saved_trained).load_init(same, state)
    assert all(torch.equal(a, b) for a, b in zip(same.medusa_state().values(), state.values()))


def test_load_fasterdecoding_layout(tiny_pair, tmp_path):
    """``medusa_lm_head.pt`` with ``{i}.{j}.linear.weight/bias`` per ResBlock and ``{i}.{n}.weight`` (Linear(H, V),
    no bias) per head; ``config.json`` with ``medusa_num_heads`` / ``medusa_num_layers`` (FasterDecoding/Medusa)."""
    g = torch.Generator().manual_seed(0)
    heads, layers = 3, 2
    sd = {}
    for i in range(heads):
        for j in range(layers):
            sd[f"{i}.{j}.linear.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1
            sd[f"{i}.{j}.linear.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
        sd[f"{i}.{layers}.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    torch.save(sd, tmp_path / "medusa_lm_head.pt")
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": heads, "medusa_num_layers": layers,
                                                      "base_model_name_or_path": "tiny"}))
    net = load_medusa(tmp_path, tiny_pair[1].lm_head)
    assert net.config.num_heads == heads and net.config.num_layers == layers and net.config.trained_head
    x = torch.randn(2, HIDDEN, generator=g)
    silu = torch.nn.functional.silu
    logits = net.logits(net(x))                                                   # [2, D, V]
    for i in range(heads):
        y = x
        for j in range(layers):
            y = y + silu(y @ sd[f"{i}.{j}.linear.weight"].T + sd[f"{i}.{j}.linear.bias"])
        torch.testing.assert_close(logits[:, i], y @ sd[f"{i}.{layers}.weight"].T, atol=1e-4, rtol=1e-4)


def test_tree_uses_the_last_committed_feature_and_heads_in_order(heads):
    d = MedusaDrafter(heads, 12, MedusaConfig(top_k=3))
    feed_random_context(d, "a", [5, 6, 7, 8])
    tree = d.propose([DraftRequest("a", [5, 6, 7, 8], SamplingParams(), 12)])[0]
    feature = d.features["a"]
    top = heads.logits(heads(feature)).topk(3, -1).indices                        # [D, 3]
    assert len(tree) == 12 and tree.max_depth <= 4
    for n, depth in enumerate(tree.depths):
        assert tree.tokens[n] in top[depth - 1].tolist()                          # depth d from head d - 1
    assert tree.tokens[0] == top[0, 0]


def test_budget_top_k_and_depth_limits(heads):
    d = MedusaDrafter(heads, 10, MedusaConfig(top_k=4, num_heads=2))
    assert d.tree_shape() == (2, 4)
    feed_random_context(d, "a", [5, 6, 7])
    params = SamplingParams(draft_top_k=2, draft_depth=1)
    tree = d.propose([DraftRequest("a", [5, 6, 7], params, 6),
                      DraftRequest("b", [1, 2], SamplingParams(), 6),                 # no feature yet: no draft
                      DraftRequest("a", [5, 6, 7], SamplingParams(), 40)])
    assert len(tree[0]) == 2 and tree[0].max_depth == 1
    assert len(tree[1]) == 0
    assert len(tree[2]) == 10 and tree[2].max_depth <= 2
    d.release("a")
    assert not d.features


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_batched_drafts_equal_solo(heads, tree):
    contexts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [3, 4], "c": [20, 21, 22, 23]}
    cfg = MedusaConfig(tree=tree, top_k=4)
    assert_batched_drafts_equal_solo(lambda: MedusaDrafter(heads, 9, cfg, STATIC), contexts, 9)


def test_static_tree_is_the_fixed_paths(heads):
    d = MedusaDrafter(heads, 16, MedusaConfig(tree="static"), STATIC)
    feed_random_context(d, "a", [5, 6, 7])
    tree = d.propose([DraftRequest("a", [5, 6, 7], SamplingParams(), 6)])[0]
    top = heads.logits(heads(d.features["a"])).topk(3, -1).indices
    assert tree.parents == (-1, -1, 0, -1, 0, 1)
    assert tree.tokens == tuple(int(top[len(p) - 1, p[-1]]) for p in STATIC[:6])
    with pytest.raises(ValueError):
        MedusaDrafter(heads, 16, MedusaConfig(tree="static"))


@pytest.mark.parametrize(("tree", "batch"), [("dynamic", 1), ("dynamic", 6), ("static", 1), ("static", 6)])
def test_random_medusa_drafter_is_lossless(tiny_pair, heads, tree, batch):
    hf, target = tiny_pair
    drafter = MedusaDrafter(heads, 8, MedusaConfig(tree=tree, top_k=3), STATIC)
    assert_drafter_lossless(hf, target, drafter, batch, seed=5)


def test_trained_truncated_heads_are_lossless(tiny_pair):
    hf, target = tiny_pair
    ids = torch.arange(3, 150, 2)
    heads = make_heads(target.lm_head.weight, 3, trained=True, ids=ids, std=0.2)
    assert_drafter_lossless(hf, target, MedusaDrafter(heads, 8, MedusaConfig(top_k=3)), 3, seed=2)


@torch.no_grad()
def second_token_marginal(hf, prompt: list[int], temperature: float) -> torch.Tensor:
    """Exact distribution of the second sampled token: ``sum_x1 p(x1) p(x2 | x1)``.  # [V]"""
    first = (hf(torch.tensor([prompt])).logits[0, -1] / temperature).softmax(-1)            # [V]
    seqs = torch.tensor([prompt + [t] for t in range(VOCAB)])                                # [V, P + 1]
    return (first @ (hf(seqs).logits[:, -1] / temperature).softmax(-1)).double()            # [V]


def test_sampled_tokens_keep_the_target_distribution(tiny_pair):
    """Sampling through Medusa trees (q = 1) draws the second token from the target's own marginal."""
    hf, target = tiny_pair
    heads = MedusaHeads(MedusaHeadsSpec(HIDDEN, VOCAB, 2, 1), target.lm_head.weight)   # identity heads: wide trees
    prompt, draws, temperature = [7, 80, 15, 42, 9], 2400, 0.5
    want = second_token_marginal(hf, prompt, temperature)
    engine = tiny_engine(target, num_blocks=512, max_num_seqs=64, drafter=MedusaDrafter(heads, 32, MedusaConfig(top_k=32)))
    reqs = [engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=40, temperature=temperature, seed=i,
                                                               draft_tokens=32)) for i in range(draws)]
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():                        # stop each request once it has its second token
        for o in engine.step()[0]:
            got.setdefault(o.request_id, []).extend(o.token_ids)
            if len(got[o.request_id]) >= 2 and not o.finished:
                engine.abort(o.request_id)
    assert sum(r.spec.accepted_tokens for r in reqs) > draws // 50                # drafts were accepted
    big = (want * draws >= 5).nonzero().flatten().tolist()                        # own cell; the rest pooled
    cell = {t: i for i, t in enumerate(big)}
    probs = torch.cat([want[big], (1 - want[big].sum()).clamp(min=0)[None]])
    samples = [cell.get(toks[1], len(big)) for toks in got.values()]
    if probs[-1] * draws < 5:
        probs, samples = probs[:-1] / probs[:-1].sum(), [s for s in samples if s < len(big)]
    assert chi2_pvalue(samples, probs) > 1e-3


def test_medusa_training_learns_resumes_and_writes_the_static_tree(tmp_path):
    cfg_target = tiny_hf_config(vocab_size=260)
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, cfg_target)
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), lr=3e-2, batch_size=4, epochs=20,
                      warmup=2, log_every=1, save_every=50, seed=0)
    recipe = MedusaRecipe(num_heads=3, num_layers=1, trained_head=False, decay=0.8)
    summary = train_medusa(cfg, cfg_target, embed, embed, recipe)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert summary["steps"] == 40 and log["held_out_top1_by_head"] == summary["held_out_top1_by_head"]
    first, last = ({k: sum(r[k] for r in rows) / 4 for k in ("loss", "acc_h0", "acc_h2")}
                   for rows in (log["log"][:4], log["log"][-4:]))
    assert last["loss"] < 0.6 * first["loss"] and last["acc_h0"] > first["acc_h0"] + 0.2
    assert last["acc_h2"] > first["acc_h2"] + 0.1
    assert len(summary["held_out_top1_by_head"]) == 3 and summary["held_out"]["tokens"] > 0
    paths = load_static_tree(tmp_path / "out" / STATIC_TREE_FILE)
    accuracy = json.loads((tmp_path / "out" / STATIC_TREE_FILE).read_text())["accuracy"]
    assert paths == static_paths(accuracy, 64) and np.allclose(np.array(accuracy)[:, 0],
                                                               summary["held_out_top1_by_head"], atol=1e-4)
    loaded = load_medusa(tmp_path / "out", embed)
    assert loaded.config.num_heads == 3 and not loaded.config.trained_head
    resumed = train_medusa(TrainConfig(**{**cfg.__dict__, "epochs": 22, "resume": True}), cfg_target, embed, embed,
                           recipe)
    assert resumed["steps"] == 44


def test_medusa_truncated_trained_head_training_under_autocast(tmp_path):
    cfg_target = tiny_hf_config(vocab_size=260)
    model, _ = tiny_features(tmp_path / "work", word_records(12), 4, cfg_target)
    embed = model.model.embed_tokens.weight.detach()
    cfg = TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), lr=1e-2, batch_size=4, epochs=10,
                      warmup=2, log_every=1, save_every=50, seed=0, head_vocab=32, amp=True)
    summary = train_medusa(cfg, cfg_target, embed, embed, MedusaRecipe(2, 1, trained_head=True))
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"] and summary["head_vocab"] == 32
    loaded = load_medusa(tmp_path / "out", embed)
    assert loaded.config.trained_head and loaded.head_token_ids.shape == (32,) and loaded.out.shape == (2, 32, 64)
    warm = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "warm"), "init": str(tmp_path / "out"),
                          "lr": 1e-9, "epochs": 1})
    train_medusa(warm, cfg_target, embed, embed, MedusaRecipe(2, 1, trained_head=True))
    warm_log = json.loads((tmp_path / "warm" / "train_log.json").read_text())["log"]
    assert warm_log[0]["loss"] < 0.8 * log[0]["loss"]                             # starts where --init left off
    rewarmed = load_medusa(tmp_path / "warm", embed)
    assert torch.equal(rewarmed.head_token_ids, loaded.head_token_ids)
