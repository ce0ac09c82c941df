"""Tree verification in the engine is lossless: greedy output equals plain greedy decoding."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest
from helpers import (
    assert_matches_reference,
    random_prompts,
    reference_greedy,
    run_to_completion,
    tiny_engine,
)

from drafters.base import Drafter
from drafters.lookup import LookupDrafter
from drafters.tree import DraftTree
from server.engine.request import SamplingParams


class OracleDrafter(Drafter):
    """Knows the true continuation; hides it among wrong siblings, placed after them in index order."""

    name = "oracle"

    def __init__(self, truth: dict[tuple, list[int]], budget: int = 12, depth: int = 5, seed: int = 0):
        self.truth, self.max_tree_tokens, self.depth = truth, budget, depth
        self.rng = random.Random(seed)

    def propose(self, requests):
        trees = []
        for r in requests:
            prompt, future = next((list(p), t) for p, t in self.truth.items()
                                  if list(p) == r.token_ids[:len(p)])
            done = len(r.token_ids) - len(prompt)
            path = future[done:done + self.depth]
            tokens, parents, parent = [], [], -1
            for tok in path:
                if len(tokens) + 2 > r.budget:
                    break
                tokens += [(tok + 1) % 211, tok]   # wrong sibling first, so true node index != depth
                parents += [parent, parent]
                parent = len(tokens) - 1
            trees.append(DraftTree(tokens, parents, [-float(i) for i in range(len(tokens))]))
        return trees


class RandomTreeDrafter(Drafter):
    name = "random"

    def __init__(self, budget: int = 10, seed: int = 0):
        self.max_tree_tokens, self.rng = budget, random.Random(seed)

    def propose(self, requests):
        trees = []
        for r in requests:
            n = self.rng.randint(0, r.budget)
            parents = [self.rng.randint(-1, i - 1) for i in range(n)]
            tokens = [r.token_ids[-1] if self.rng.random() < 0.5 else self.rng.randint(3, 210) for _ in range(n)]
            trees.append(DraftTree(tokens, parents, [0.0] * n))
        return trees


def prompts(n: int) -> list[list[int]]:
    return random_prompts(n, seed=9, min_len=4, max_len=20)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


@pytest.mark.parametrize("batch", [1, 8])
def test_lookup_drafter_is_lossless(tiny_pair, batch):
    hf, model = tiny_pair
    engine = tiny_engine(model, num_blocks=256, drafter=LookupDrafter(max_tree_tokens=8))
    assert_matches_reference(engine, hf, prompts(batch), 40)


@pytest.mark.parametrize("batch", [1, 8])
def test_oracle_trees_accept_deep_paths_and_stay_lossless(tiny_pair, batch):
    hf, model = tiny_pair
    ps = prompts(batch)
    truth = {tuple(p): reference_greedy(hf, p, 30) for p in ps}
    engine = tiny_engine(model, num_blocks=256, drafter=OracleDrafter(truth))
    reqs = assert_matches_reference(engine, hf, ps, 30)
    taus = [r.spec.mean_acceptance_length for r in reqs]
    assert min(taus) > 3.0, taus  # deep acceptance really happened (5 drafts + bonus per step at most)


def test_random_trees_under_preemption_are_lossless(tiny_pair):
    hf, model = tiny_pair
    engine = tiny_engine(model, num_blocks=20, block_size=4, drafter=RandomTreeDrafter())
    reqs = assert_matches_reference(engine, hf, [p[:10] for p in prompts(4)], 35)
    assert sum(r.num_preemptions for r in reqs) > 0


def test_speculative_sampling_runs_and_is_seed_reproducible(tiny_pair):
    _, model = tiny_pair
    p = prompts(1)[0]
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, top_k=50, seed=3)
    runs = [run_to_completion(tiny_engine(model, drafter=LookupDrafter(8)), {"a": (p, params)})["a"]
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_lookup_tree_structure():
    tree = LookupDrafter(max_tree_tokens=6, max_depth=3)._tree([5, 6, 7, 1, 5, 6, 8, 2, 5, 6], budget=6)
    assert tree.tokens[:2] == (8, 2) and len(tree) <= 6
    assert set(tree.tokens) >= {8, 7}  # both earlier continuations of (5, 6) are branches
    assert LookupDrafter()._tree([1, 2, 3], budget=4).tokens == ()



def tiny_eagle(model):
    import torch
    from helpers import tiny_hf_config

    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import EagleConfig, EagleDrafter

    torch.manual_seed(4)
    net = EagleDrafter(EagleConfig.from_target(tiny_hf_config()), model.embed_tokens.weight,
                       model.lm_head.weight).eval()
    return EagleTreeDrafter(net, total_tokens=8, depth=3, top_k=3)


@pytest.mark.parametrize("kind", ["eagle", "oracle"])
def test_budget_policy_switches_drafting_off_and_on_losslessly(tiny_pair, kind):
    """Budget 6 when one request decodes, 0 (no drafting; EAGLE still fed the committed features) when
    more do: greedy output equals plain decoding as requests finish and the budget comes back."""
    from server.engine.budget import BudgetPolicy

    hf, model = tiny_pair
    ps, lengths = prompts(3), [8, 14, 30]
    drafter = tiny_eagle(model) if kind == "eagle" else OracleDrafter(
        {tuple(p): reference_greedy(hf, p, 30) for p in ps}, budget=8)
    asked: list[int] = []
    propose = drafter.propose
    drafter.propose = lambda requests: asked.append(len(requests)) or propose(requests)
    engine = tiny_engine(model, num_blocks=256, drafter=drafter, budget_policy=BudgetPolicy((6, 0, 0, 0)))
    reqs = [engine.add_request(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(ps, lengths))]
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    steps = []
    while engine.has_unfinished():
        outputs, stats = engine.step()
        steps.append((stats.spec_budget, stats.drafted))
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert got[f"r{i}"] == reference_greedy(hf, p, n), f"prompt {i}"
    assert any(b == 0 and len(d) > 1 and not any(d) for b, d in steps)          # batched steps: no trees
    assert any(b == 6 and d and d[0] > 0 for b, d in steps)                      # alone: trees again
    assert asked and set(asked) == {1}                                           # drafter only called alone
    assert [r.spec.drafted_tokens > 0 for r in reqs] == [False, False, True]
    assert kind == "eagle" or reqs[2].spec.accepted_tokens > 0
    assert engine.scheduler.kv.pool.usage == 0.0 and (kind == "oracle" or not drafter.states)


def test_served_budget_probes_alternate_trees_and_plain_steps_losslessly(tiny_pair):
    """``ServedBudgets`` probing plain decoding after every clean tree step (interval 1): the engine
    reports each clean step back, trees and plain steps alternate, and greedy output equals plain decoding."""
    from server.engine.budget import BudgetPolicy
    from server.engine.budget_feedback import ServedBudgets

    hf, model = tiny_pair
    ps, lengths = prompts(2), [20, 26]
    policy = ServedBudgets(BudgetPolicy((6, 6)), (0, 0), min_interval=1, max_interval=1)
    engine = tiny_engine(model, num_blocks=256, drafter=tiny_eagle(model), budget_policy=policy)
    reqs = [engine.add_request(f"r{i}", p, greedy(n)) for i, (p, n) in enumerate(zip(ps, lengths))]
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    budgets = []
    while engine.has_unfinished():
        outputs, stats = engine.step()
        budgets.append(stats.spec_budget)
        for o in outputs:
            got[o.request_id].extend(o.token_ids)
    for i, (p, n) in enumerate(zip(ps, lengths)):
        assert got[f"r{i}"] == reference_greedy(hf, p, n), f"prompt {i}"
    decoding = [b for b in budgets if b is not None]
    assert decoding.count(0) >= 3 and decoding.count(6) >= 3
    assert any(a == 6 and b == 0 for a, b in pairwise(decoding))                      # a probe right after a tree
    assert policy.arms[1].ratios                                                    # clean steps reached it
