"""GSD drafter (drafters/gsd.py): batching over the node interface, losslessness on tiny models, forward counts."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from helpers import (
    assert_drafter_lossless,
    hf_model_from,
    native_from,
    run_to_completion,
    tiny_engine,
    tiny_hf_config,
)

from drafters.base import AcceptUpdate, DraftRequest
from drafters.gsd import GsdDrafter
from drafters.gsd_config import GsdConfig
from drafters.gsd_graph import TokenGraph
from server.engine.request import SamplingParams

VOCAB = 6


def markov_logprobs(seq: list[int]) -> torch.Tensor:
    """A second-order "draft model" over ``VOCAB`` tokens: log-probs ``[VOCAB]`` of the token after ``seq``."""
    rng = random.Random(hash(tuple(seq[-2:])))
    return torch.tensor([rng.choice([1.0, 2.0, 4.0, 9.0]) for _ in range(VOCAB)]).log_softmax(-1)


class FakeNodes:
    """A node-forward test double: rebuilds each node's token path from the parents it is given."""

    max_tree_tokens = 64

    def __init__(self, fail_after: int | None = None):
        self.states: dict = {}
        self.paths: dict[str, list[list[int]]] = {}
        self.calls, self.fail_after = 0, fail_after

    def start(self, requests: list[DraftRequest]) -> list[torch.Tensor | None]:
        self.paths = {r.request_id: [] for r in requests}
        self.context = {r.request_id: r.token_ids for r in requests}
        return [markov_logprobs(r.token_ids) for r in requests]

    def forward_nodes(self, request_ids, tokens, parents) -> list[torch.Tensor]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise MemoryError("no scratch slot")
        out = []
        for rid, toks, pars in zip(request_ids, tokens, parents):
            rows = []
            for tok, par in zip(toks, pars):
                assert -1 <= par < len(self.paths[rid])
                self.paths[rid].append((self.paths[rid][par] if par >= 0 else self.context[rid]) + [tok])
                rows.append(markov_logprobs(self.paths[rid][-1]))
            out.append(torch.stack(rows) if rows else torch.empty(0, VOCAB))
        return out


def solo_graph(context: list[int], config: GsdConfig) -> TokenGraph:
    """The graph of one request drafted directly, without the drafter's batching."""
    graph = TokenGraph(context[-1], config)
    while not graph.done:
        cands = []
        for v in graph.pending:
            path = []
            while v >= 0:
                path.append(graph.nodes[v].token)
                v = graph.nodes[v].parent
            logp = markov_logprobs(context[:-1] + path[::-1])
            top = logp.topk(config.top_n)
            cands.append(list(zip(top.indices.tolist(), top.values.exp().tolist())))
        graph.expand(cands)
    return graph


def asks(budgets: list[int], **params) -> list[DraftRequest]:
    return [DraftRequest(f"r{i}", [i % VOCAB, (i + 2) % VOCAB], SamplingParams(**params), b)
            for i, b in enumerate(budgets)]


@pytest.mark.parametrize("repeat", [-1, 0, 1])
def test_batched_propose_equals_solo_graphs(repeat):
    config = GsdConfig(top_n=3, sibling_threshold=0.2, prob_threshold=0.2, repeat_threshold=repeat, max_steps=4)
    drafter = GsdDrafter(FakeNodes(), config)
    requests = asks([12, 0, 30, 5])
    trees = drafter.propose(requests)
    assert len(trees[1]) == 0
    for r, tree in zip(requests, trees):
        if r.budget:
            assert tree == solo_graph(r.token_ids, config).unroll(r.budget)
    report = drafter.bench_report()
    assert report["totals"]["rounds"] == 3
    if repeat < 0:
        assert report["totals"]["nodes_fed"] == report["totals"]["unmerged_nodes_fed"]
    else:
        assert report["totals"]["merges"] > 0 and report["nodes_fed_saved_by_merging"] > 0


def test_request_overrides_and_full_draft_kv():
    config = GsdConfig(top_n=3, sibling_threshold=0.0, prob_threshold=0.0, repeat_threshold=-1, max_steps=4)
    trees = GsdDrafter(FakeNodes(), config).propose(asks([64], draft_depth=2, draft_top_k=2))
    assert trees[0].max_depth == 2 and all(len(trees[0].children(i)) <= 2 for i in range(-1, len(trees[0])))
    drafter = GsdDrafter(FakeNodes(fail_after=1), config)
    tree = drafter.propose(asks([64]))[0]
    assert tree.max_depth == 2 and drafter.totals["stop_draft_kv_full"] == 1


# ---------------------------------------------------------------- on the tiny model, through the engine


def make(model, repeat: int, budget: int = 10, **options) -> GsdDrafter:
    from drafters.draft_model import DraftModelDrafter

    config = GsdConfig(repeat_threshold=repeat, **options)
    inner = DraftModelDrafter.create(model, 4096, budget, depth=config.max_steps,
                                     top_k=-(-config.max_nodes // config.max_steps))
    return GsdDrafter(inner, config)


def sharp_model(seed: int, layers: int):
    """A tiny random Llama (untied head scaled 16x, so its distributions are peaked like a trained model's and
    GSD drafts several steps): (transformers model, native model)."""
    cfg = tiny_hf_config(tie_word_embeddings=False, num_hidden_layers=layers)
    hf = hf_model_from(cfg, seed=seed)
    with torch.no_grad():
        hf.lm_head.weight.mul_(16)
    return hf, native_from(cfg, hf.state_dict())


@pytest.fixture(scope="module")
def sharp_pair():
    return sharp_model(0, 2)


@pytest.fixture(scope="module")
def tiny_draft():
    """A different (one-layer, other seed) draft model over the same vocabulary."""
    return sharp_model(3, 1)[1]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("repeat", [-1, 0])
def test_greedy_lossless_random_draft(sharp_pair, tiny_draft, batch, repeat):
    hf, target = sharp_pair
    assert_drafter_lossless(hf, target, make(tiny_draft, repeat), batch=batch, seed=batch)


def test_self_draft_merge_on_off_equal_outputs_and_forwards_saved(sharp_pair):
    """Drafting with a copy of the target: lossless with and without merging, the same outputs, and merging
    feeds fewer nodes per round than the same drafter without merging (and than its un-merged graphs would)."""
    hf, target = sharp_pair
    runs = {}
    for repeat in (-1, 0):
        drafter = make(copy.deepcopy(target), repeat)
        assert_drafter_lossless(hf, target, drafter, batch=2, seed=11, max_tokens=30)
        engine = tiny_engine(target, num_blocks=256, drafter=drafter)
        prompts = {f"q{i}": (list(range(9 + i, 21 + i)), SamplingParams(max_tokens=40, temperature=0))
                   for i in range(3)}
        runs[repeat] = (run_to_completion(engine, prompts), drafter.bench_report())
    assert runs[-1][0] == runs[0][0]
    plain, merged = runs[-1][1], runs[0][1]
    assert plain["totals"]["merges"] == 0 and plain["nodes_fed_saved_by_merging"] == 0
    assert merged["totals"]["merges"] > 0
    assert merged["per_round"]["nodes_fed"] < merged["per_round"]["unmerged_nodes_fed"]
    assert merged["per_round"]["nodes_fed"] < plain["per_round"]["nodes_fed"]


def test_sampled_requests_draft_deterministically(sharp_pair, tiny_draft):
    """A sampled request gets the greedy request's tree (top-n drafts, no draft_probs: verified with q = 1, the
    exact sampling verifier); seeded sampled requests that ask for drafts run clean through the engine."""
    _, target = sharp_pair
    drafter = make(tiny_draft, 0)
    tokens = list(range(30, 45))
    trees = []
    for rid, params in (("g", SamplingParams(temperature=0.0)), ("s", SamplingParams(temperature=0.8, seed=1))):
        drafter.on_accept([AcceptUpdate(rid, 0, tokens[:-1], torch.zeros(len(tokens) - 1, 1), tokens[-1], reset=True)])
        trees.append(drafter.propose([DraftRequest(rid, tokens, params, 10)])[0])
    assert len(trees[0]) > 0 and trees[0] == trees[1] and trees[1].draft_probs is None
    engine = tiny_engine(target, num_blocks=256, drafter=make(tiny_draft, 0))
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=5, draft_tokens=8)   # seeded: drafts if asked
    reqs = [engine.add_request(f"s{i}", list(range(4 + i, 15 + i)), params) for i in range(2)]
    run_to_completion(engine, {})
    assert all(r.spec.drafted_tokens > 0 and r.num_output_tokens == 20 for r in reqs)
    assert engine.scheduler.kv.pool.usage == 0.0 and not engine.runner.drafter.states


def test_registry_builds_gsd_over_the_draft_model(tmp_path, tiny_pair):
    """``--drafter gsd``: the draft-model drafter inside, its scratch KV sized for ``gsd.max_nodes``."""
    import json

    from unit.drafters.test_draft_model_load import draft_state

    from drafters.draft_model import DraftModelDrafter
    from drafters.registry import build_drafter
    from drafters.train.draft_model import save_draft_model
    from server.config import ServerConfig

    _, target = tiny_pair
    cfg, state = draft_state()
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps(tiny_hf_config()))
    save_draft_model(tmp_path / "draft", native_from(cfg, {**state, "model.embed_tokens.weight":
                                                           target.embed_tokens.weight.detach()}), cfg, {})
    config = ServerConfig(model=str(tmp_path / "target"), drafter="gsd", drafter_path=str(tmp_path / "draft"),
                          num_kv_blocks=10, block_size=4, max_num_seqs=2, max_draft_tokens=12,
                          gsd={"max_steps": 4, "max_nodes": 18, "repeat_threshold": 1})
    drafter = build_drafter("gsd", config, target)
    assert isinstance(drafter, GsdDrafter) and isinstance(drafter.inner, DraftModelDrafter)
    assert drafter.config.repeat_threshold == 1 and drafter.tree_shape() == (4, 4)
    assert drafter.inner.scratch >= 18 and drafter.max_tree_tokens == 12
    tokens = list(range(20, 32))
    tree = drafter.propose([DraftRequest("r", tokens, SamplingParams(), 12)])[0]
    assert 0 < len(tree) <= 12 and drafter.bench_report()["totals"]["rounds"] == 1
