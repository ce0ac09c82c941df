"""Drafter KV rows (``drafters.draft_kv``): growth, dense rows, gathered batches, early stop, no leftovers."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_hf_config

from drafters.base import AcceptUpdate, DraftRequest
from drafters.draft_kv import DraftKV
from drafters.eagle import EagleTreeDrafter
from drafters.eagle_model import EagleConfig, EagleDrafter
from drafters.gumiho import GumihoTreeDrafter
from drafters.gumiho_model import GumihoConfig, GumihoDrafter
from drafters.tree import rerank
from server.engine.request import SamplingParams

HIDDEN = 64


def random_net(cls, cfg, target, seed: int = 4):
    torch.manual_seed(seed)
    net = cls(cfg, target.embed_tokens.weight, target.lm_head.weight).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module", params=["eagle", "gumiho"])
def make(request, tiny_pair):
    """A factory of fresh drafters (EAGLE, then Gumiho) over one random network."""
    _, target = tiny_pair
    if request.param == "eagle":
        net = random_net(EagleDrafter, EagleConfig.from_target(tiny_hf_config()), target)
        return lambda: EagleTreeDrafter(net, total_tokens=10, depth=4, top_k=3)
    cfg = GumihoConfig.from_dict(tiny_hf_config(), num_hidden_layers=2, mlp_num=3, mlp_res_blocks=1)
    net = random_net(GumihoDrafter, cfg, target)
    return lambda: GumihoTreeDrafter(net, total_tokens=10, depth=5, top_k=3, mlp_top_k=3, pruning=3)


def history(length: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 211, (length,), generator=g).tolist(), torch.randn(length, HIDDEN, generator=g)


def fed(drafter, rid: str, tokens: list[int], feats: torch.Tensor, upto: int) -> None:
    """Reset ``rid`` with ``tokens[:upto]`` committed (root ``tokens[upto - 1]``)."""
    drafter.on_accept([AcceptUpdate(rid, 0, tokens[:upto - 1], feats[:upto - 1], tokens[upto - 1], reset=True)])


def ask(rid: str, tokens: list[int], upto: int, budget: int = 10) -> DraftRequest:
    return DraftRequest(rid, tokens[:upto], SamplingParams(), budget)


def assert_same_tree(a, b) -> None:
    """Same nodes; scores equal to fp32 rounding. A fresh drafter runs the history in one context pass (a
    many-row product) and the grown one in steps of 1-3 rows (other kernels), and the random 2-layer Gumiho
    net amplifies their rounding: 2.6e-4 apart on a Zen 4 host. A wrong KV row moves scores by far more."""
    assert a.tokens == b.tokens and a.parents == b.parents
    assert a.scores == pytest.approx(b.scores, rel=1e-3, abs=1e-3)


def test_drafts_after_growth_equal_a_fresh_drafter(make):
    """Many steps of 1-3 committed tokens through a buffer that starts tiny and doubles (capacity and rows): each
    step's tree equals that of a fresh drafter fed the whole history at once."""
    tokens, feats = history(90)
    d = make()
    d.kv = DraftKV(d.kv.keys.shape[1], d.kv.keys.shape[3], torch.float32, torch.device("cpu"), rows=1, capacity=4)
    fed(d, "other", *history(20, seed=1), 20)                 # a second row: rows grow too
    fed(d, "a", tokens, feats, 6)
    pos, sizes = 6, [1, 3, 2, 1, 3, 3, 2, 1, 2, 3]
    for step in range(24):
        tree = d.propose([ask("a", tokens, pos)])[0]
        fresh = make()
        fed(fresh, "a", tokens, feats, pos)
        assert_same_tree(tree, fresh.propose([ask("a", tokens, pos)])[0])
        n = sizes[step % len(sizes)]
        d.on_accept([AcceptUpdate("a", pos - 1, tokens[pos - 1:pos - 1 + n], feats[pos - 1:pos - 1 + n],
                                  tokens[pos - 1 + n])])
        pos += n
    assert d.kv.capacity >= d.states["a"].length + d.depth * d.top_k > 64 and d.kv.keys.shape[0] == 2


def test_gathered_batches_equal_one_by_one(make):
    """Requests whose rows are not consecutive (a gathered copy), asked in any order, get their solo trees, and
    the context they commit through the copy is written back to their rows."""
    contexts = {rid: history(8 + 3 * i, seed=i) for i, rid in enumerate("abcd")}
    d = make()
    for rid, (tokens, feats) in contexts.items():
        fed(d, rid, tokens, feats, len(tokens))
    solo = {}
    for rid, (tokens, feats) in contexts.items():
        s = make()
        fed(s, rid, tokens, feats, len(tokens))
        solo[rid] = s.propose([ask(rid, tokens, len(tokens))])[0]
    for round_ in range(2):                                   # round 2: no context pass, rows read back
        got = d.propose([ask(rid, contexts[rid][0], len(contexts[rid][0])) for rid in ("d", "a", "c")])
        for rid, tree in zip(("d", "a", "c"), got):
            assert_same_tree(tree, solo[rid])
    assert d.propose([ask("b", contexts["b"][0], len(contexts["b"][0]))])[0] == solo["b"]


def test_release_frees_the_row_and_keeps_the_others(make):
    d = make()
    contexts = {rid: history(10 + i, seed=i) for i, rid in enumerate("abc")}
    for rid, (tokens, feats) in contexts.items():
        fed(d, rid, tokens, feats, len(tokens))
    before = {rid: t for rid, t in zip(contexts, d.propose([ask(r, c[0], len(c[0])) for r, c in contexts.items()]))}
    d.release("a")
    assert d.kv.owners == ["c", "b"] and d.kv.rows == {"c": 0, "b": 1} and set(d.states) == {"b", "c"}
    after = d.propose([ask(r, contexts[r][0], len(contexts[r][0])) for r in ("b", "c")])
    assert_same_tree(after[0], before["b"])
    assert_same_tree(after[1], before["c"])
    fed(d, "e", *contexts["a"], len(contexts["a"][0]))       # a new request takes the freed row at the end
    assert d.kv.rows["e"] == 2 and d.kv.keys.shape[0] == 4
    for rid in ("b", "c", "e", "never-seen"):
        d.release(rid)
    assert not d.states and not d.kv.rows and not d.kv.owners


def test_early_stop_leaves_the_trees_unchanged(make):
    """Stopping once no deeper node can make the budget gives the rerank of the full expansion, for every budget."""
    tokens, feats = history(12)
    for budget in (1, 2, 4, 6, 10):
        d, full = make(), make()
        for x in (d, full):
            fed(x, "a", tokens, feats, 12)
        k, depth = d.top_k, d.depth
        pool = full.draft(["a"], k, depth, [10**6])
        want = rerank(pool.tokens[0].tolist(), pool.parents[0].tolist(), pool.scores[0].tolist(), budget)
        assert d.propose([ask("a", tokens, 12, budget)])[0] == want
        short = d.draft(["a"], k, depth, [budget])
        assert short.tokens.shape[1] <= pool.tokens.shape[1]


def test_measure_draft_cost_leaves_no_rows(make):
    from server.worker.calibrate import measure_draft_cost

    d = make()
    measure_draft_cost(d, HIDDEN, 211, [1, 2], [4, 8], context=24, repeats=1)
    assert not d.states and not d.kv.rows and not d.kv.owners
