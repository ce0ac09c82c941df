"""The engine on CUDA: Triton attention, device-side sampling, CUDA graphs; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_reference, random_prompts, tiny_engine

from drafters.lookup import LookupDrafter
from kernels import SeqAttention
from server.engine.request import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_lookup_on_cuda_equals_plain_greedy(tiny_pair, graphs, batch):
    """fp32 on the GPU (IEEE dots in the kernel, no TF32) against transformers on the CPU."""
    hf, model = tiny_pair
    engine = tiny_engine(model, num_blocks=256, device="cuda", attention_backend="triton", cuda_graphs=graphs,
                         drafter=LookupDrafter(max_tree_tokens=8))
    assert_matches_reference(engine, hf, random_prompts(batch, seed=3, min_len=4, max_len=20), 30)
    if graphs:
        assert engine.runner.graphs.steps, "no graph was captured"


def test_graph_replay_equals_eager_forward(tiny_pair):
    _, model = tiny_pair
    engine = tiny_engine(model, num_blocks=64, block_size=16, device="cuda", attention_backend="triton",
                         cuda_graphs=True, drafter=LookupDrafter(max_tree_tokens=8), max_num_seqs=4)
    runner = engine.runner
    tables = [runner.kv.allocate(f"s{i}", 60) for i in range(3)]
    prompt = random_prompts(3, seed=1, min_len=40, max_len=41)
    for table, ids in zip(tables, prompt):                                         # eager prefill
        runner.forward(ids, list(range(40)), [SeqAttention(table, 0, 40)], has_prefill=True)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool).numpy()
    seqs = [SeqAttention(tables[0], 40, 1), SeqAttention(tables[1], 40, 4, tree), SeqAttention(tables[2], 40, 2)]
    ids = [5, 6, 7, 8, 9, 10, 11]
    positions = [40, 40, 41, 41, 42, 40, 41]
    graphed = runner.graphs.run(ids, positions, seqs)
    assert graphed is not None
    eager = runner.forward(ids, positions, seqs, has_prefill=True)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_on_cuda_is_reproducible(tiny_pair):
    _, model = tiny_pair
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7)
    outs = []
    for _ in range(2):
        engine = tiny_engine(model, num_blocks=128, device="cuda", attention_backend="triton",
                             drafter=LookupDrafter(max_tree_tokens=8))
        engine.add_request("r", random_prompts(1, seed=5, min_len=8, max_len=9)[0], params)
        got = []
        while engine.has_unfinished():
            outputs, _ = engine.step()
            got += [t for o in outputs for t in o.token_ids]
        outs.append(got)
    assert outs[0] == outs[1] and len(outs[0]) == 20


@pytest.mark.parametrize("method", ["eagle", "hybrid"])
@pytest.mark.parametrize("batch", [1, 4])
def test_tree_drafters_on_cuda_are_lossless(tiny_eagle, method, batch):
    """The EAGLE drafter (and the hybrid around it) keeps its state on the GPU; greedy stays exact."""
    import copy

    from helpers import assert_drafter_lossless

    from drafters.eagle import EagleTreeDrafter
    from drafters.hybrid import HybridDrafter

    hf, target, net = tiny_eagle
    net = copy.deepcopy(net).cuda()
    drafter = EagleTreeDrafter(net, 12, 4, 3)
    if method == "hybrid":
        drafter = HybridDrafter(drafter, max_tree_tokens=12)
    assert_drafter_lossless(hf, target, drafter, batch, seed=batch, device="cuda", attention_backend="triton",
                            cuda_graphs=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_drafter_graph_replay_equals_its_eager_fixed_shape_run(tiny_eagle, batch):
    """The EAGLE context pass and expansion replayed from CUDA graphs draft what the same fixed-shape code does
    eagerly."""
    import copy

    from helpers import feed_random_context

    from drafters.base import DraftRequest
    from drafters.eagle import EagleTreeDrafter

    _, _, net = tiny_eagle
    net = copy.deepcopy(net).cuda()
    contexts = {f"r{i}": list(range(3 + i, 8 + 2 * i)) for i in range(batch)}   # <= 8 pending: graphed
    trees = []
    for capture in (True, False):
        drafter = EagleTreeDrafter(net, 12, 4, 3)
        drafter.enable_cuda_graphs(max_num_seqs=4, max_model_len=128, capture=capture)
        for rid, toks in contexts.items():
            feed_random_context(drafter, rid, toks)
        trees.append(drafter.propose([DraftRequest(r, t, SamplingParams(), 12) for r, t in contexts.items()]))
        graphs = [*drafter.static.graphs.values(), *drafter.static_context.graphs.values()]
        assert graphs and all(g.graph is not None for g in graphs) == capture
    for graphed, eager in zip(*trees):
        assert graphed.tokens == eager.tokens and graphed.parents == eager.parents
