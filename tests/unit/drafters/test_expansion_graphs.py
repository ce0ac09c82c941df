"""The fixed-shape expansion that CUDA graphs capture drafts the trees of the dynamic one.

On CPU it runs eagerly (``enable_cuda_graphs(..., capture=False)``): same scratch columns at the end of a
frozen KV, full-width attention and no early stop as the graph, so these tests check everything but the
capture itself (``tests/gpu`` checks that).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_drafter_lossless, feed_random_context, tiny_gumiho_net

from drafters.base import AcceptUpdate, DraftRequest
from drafters.draft_kv import DraftKV
from drafters.eagle import EagleTreeDrafter
from drafters.gumiho import GumihoTreeDrafter
from server.engine.request import SamplingParams

CONTEXTS = {"a": [5, 9, 14, 3, 77, 21, 8], "b": [40, 2, 2, 19], "c": [100, 101, 7, 7, 7, 60, 3, 12, 90, 4, 33]}


def make(kind: str, target, eagle_net, static: bool):
    if kind == "eagle":
        d = EagleTreeDrafter(eagle_net, total_tokens=12, depth=4, top_k=3)
    else:
        d = GumihoTreeDrafter(tiny_gumiho_net(target), total_tokens=12, depth=6, top_k=3, mlp_top_k=4, pruning=4)
    if static:
        d.enable_cuda_graphs(max_num_seqs=4, max_model_len=96, capture=False)
    return d


def propose(d, contexts: dict[str, list[int]]) -> list:
    return d.propose([DraftRequest(rid, toks, SamplingParams(), 12) for rid, toks in contexts.items()])


def assert_same_trees(got, want) -> None:
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and g.parents == w.parents
        assert g.scores == pytest.approx(w.scores, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("kind", ["eagle", "gumiho"])
@pytest.mark.parametrize("batch", [1, 3])
def test_static_expansion_drafts_the_dynamic_trees(tiny_eagle, kind, batch):
    _, target, net = tiny_eagle
    contexts = dict(list(CONTEXTS.items())[:batch])
    dynamic, static = make(kind, target, net, False), make(kind, target, net, True)
    for d in (dynamic, static):
        for rid, toks in contexts.items():
            feed_random_context(d, rid, toks)
    assert_same_trees(propose(static, contexts), propose(dynamic, contexts))
    assert static.static.graphs and not dynamic.static                   # the fixed-shape path ran
    g = torch.Generator().manual_seed(9)
    for d in (dynamic, static):                                           # a second step after an accept
        for rid, toks in contexts.items():
            d.on_accept([AcceptUpdate(rid, len(toks) - 1, [toks[-1], 50], torch.randn(2, 64, generator=g), 51)])
        g.manual_seed(9)
    longer = {rid: toks + [50, 51] for rid, toks in contexts.items()}
    assert_same_trees(propose(static, longer), propose(dynamic, longer))
    assert (static.static_context.graphs and not dynamic.static_context)   # two pending pairs: the fixed-shape pass


def test_batches_other_than_the_first_rows_draft_eagerly(tiny_eagle):
    _, target, net = tiny_eagle
    dynamic, static = make("eagle", target, net, False), make("eagle", target, net, True)
    for d in (dynamic, static):
        for rid, toks in CONTEXTS.items():
            feed_random_context(d, rid, toks)
    tail = {"c": CONTEXTS["c"]}                                           # row 2 alone: not rows 0..n-1
    assert_same_trees(propose(static, tail), propose(dynamic, tail))
    assert not static.static.graphs


def test_frozen_kv_never_reallocates():
    kv = DraftKV(2, 4, torch.float32, torch.device("cpu"))
    kv.freeze(rows=2, capacity=32)
    keys = kv.keys
    kv.allocate("x"), kv.allocate("y")
    kv.reserve(32)
    assert kv.keys is keys and kv.keys.shape == (2, 2, 32, 4)
    with pytest.raises(RuntimeError, match="frozen"):
        kv.allocate("z")
    with pytest.raises(RuntimeError, match="frozen"):
        kv.reserve(33)


@pytest.mark.parametrize("batch", [1, 4])
def test_static_expansion_is_lossless_in_the_engine(tiny_eagle, batch):
    hf, target, net = tiny_eagle
    drafter = EagleTreeDrafter(net, 12, 4, 3)
    drafter.enable_cuda_graphs(max_num_seqs=8, max_model_len=512, capture=False)
    assert_drafter_lossless(hf, target, drafter, batch, seed=batch)
    assert drafter.static.graphs
