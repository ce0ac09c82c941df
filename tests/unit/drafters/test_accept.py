"""Greedy and lossless-sampling tree verification (drafters/accept.py).

The sampling tests are chi-square exactness checks: whatever the draft tree, the first token
emitted in a round (first accepted draft, else the bonus) must be distributed as the target's
row 0, and the token after an accepted draft as the target's row for that draft node.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import chi2_pvalue, chi2_sf
from torch.utils._python_dispatch import TorchDispatchMode

from drafters.accept import AcceptResult, _accept_topk, greedy_accept, sample_accept
from drafters.tree import DraftTree

V = 6
P_ROOT = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.10, 0.08], dtype=torch.float64)  # [V]
P_A = torch.tensor([0.05, 0.10, 0.40, 0.20, 0.15, 0.10], dtype=torch.float64)  # [V]
P_B = torch.tensor([0.20, 0.20, 0.10, 0.10, 0.30, 0.10], dtype=torch.float64)  # [V]
UNIFORM = torch.full((V,), 1.0 / V, dtype=torch.float64)  # [V]
Q_ROOT = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.05, 0.15], dtype=torch.float64)  # [V]
P_VALUE_MIN = 1e-3


def presampled(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> AcceptResult:
    """The accelerator path of ``q = 1`` verification (every row's bonus drawn before the walk)."""
    return _accept_topk(tree, probs, gen, presample=True)


def drafted_as_target(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> AcceptResult:
    """The sampled-draft path with ``q = p``."""
    return sample_accept(tree, probs, gen, draft_probs=probs)


# sample_accept takes the lazy-bonus path on the CPU; both must be exact.
TOPK_PATHS = pytest.mark.parametrize("accept", [sample_accept, presampled], ids=["cpu", "presampled"])
SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.nonzero",
    "aten.masked_select",
    "aten.multinomial",
}


class _SyncingOps(TorchDispatchMode):
    """Appends to ``reads`` every aten op that reads a value back to the host or syncs on CUDA."""

    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in SYNCING_OPS:
            self.reads.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the host reads made in the block: ``tolist`` / ``numpy`` / ``cpu`` calls and syncing ops."""
    reads: list[str] = []

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for name in ("tolist", "numpy", "cpu"):
            patch.setattr(torch.Tensor, name, counted(name))
        with _SyncingOps(reads):
            yield reads


def test_chi2_sf_known_values() -> None:
    assert chi2_sf(11.0705, 5) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(20.5150, 5) == pytest.approx(0.001, rel=1e-3)
    assert chi2_sf(3.8415, 1) == pytest.approx(0.05, rel=1e-3)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0), rel=1e-12)
    assert chi2_sf(0.5, 5) == pytest.approx(0.99221, rel=1e-4)


# ---------------------------------------------------------------- greedy

#        root
#       /    \
#    0:t5   1:t7
#    /   \      \
#  2:t1  3:t2   4:t3
#  |
#  5:t4
BRANCHY = DraftTree((5, 7, 1, 2, 3, 4), (-1, -1, 0, 0, 1, 2), (0.0,) * 6)


def argmax_rows(*rows: int) -> torch.Tensor:
    """Build a target-argmax tensor.  # [n+1] int64"""
    return torch.tensor(rows, dtype=torch.long)


def test_greedy_full_path() -> None:
    chain = DraftTree.from_chain([3, 1, 4])
    res = greedy_accept(chain, argmax_rows(3, 1, 4, 9))
    assert res == AcceptResult([0, 1, 2], [3, 1, 4], 9)
    assert res.accept_length == 3 and res.emitted == [3, 1, 4, 9]


def test_greedy_partial_path() -> None:
    chain = DraftTree.from_chain([3, 1, 4])
    assert greedy_accept(chain, argmax_rows(3, 1, 5, 9)) == AcceptResult([0, 1], [3, 1], 5)


def test_greedy_none_accepted() -> None:
    chain = DraftTree.from_chain([3, 1, 4])
    assert greedy_accept(chain, argmax_rows(8, 1, 4, 9)) == AcceptResult([], [], 8)
    assert greedy_accept(DraftTree.empty(), argmax_rows(6)) == AcceptResult([], [], 6)


def test_greedy_branch_chosen() -> None:
    # rows: root, n0, n1, n2, n3, n4, n5
    res = greedy_accept(BRANCHY, argmax_rows(5, 2, 0, 0, 8, 0, 0))
    assert res == AcceptResult([0, 3], [5, 2], 8)
    res = greedy_accept(BRANCHY, argmax_rows(7, 0, 3, 0, 0, 6, 0))
    assert res == AcceptResult([1, 4], [7, 3], 6)
    res = greedy_accept(BRANCHY, argmax_rows(5, 1, 0, 4, 0, 0, 2))
    assert res == AcceptResult([0, 2, 5], [5, 1, 4], 2)


def test_greedy_duplicate_siblings_take_first() -> None:
    tree = DraftTree((5, 5, 1, 2), (-1, -1, 0, 1), (0.0,) * 4)
    assert greedy_accept(tree, argmax_rows(5, 0, 2, 0, 0)) == AcceptResult([0], [5], 0)


def test_greedy_shape_checked() -> None:
    with pytest.raises(ValueError):
        greedy_accept(DraftTree.from_chain([1, 2]), argmax_rows(1, 2))


# ---------------------------------------------------------------- sampling


@TOPK_PATHS
def test_sample_deterministic_edge_cases(accept) -> None:
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.zeros(3, V, dtype=torch.float64)  # [n+1, V]
    one_hot[0, 2] = one_hot[1, 4] = one_hot[2, 1] = 1.0
    res = accept(DraftTree.from_chain([2, 4]), one_hot, gen)
    assert res == AcceptResult([0, 1], [2, 4], 1)
    res = accept(DraftTree.from_chain([3, 4]), one_hot, gen)
    assert res == AcceptResult([], [], 2)
    assert accept(DraftTree.empty(), one_hot[:1], gen) == AcceptResult([], [], 2)
    # q == p: every first child is accepted.
    res = sample_accept(DraftTree.from_chain([2, 4]), one_hot, gen, draft_probs=one_hot)
    assert res.nodes == [0, 1]


@TOPK_PATHS
def test_sample_reproducible_with_seed(accept) -> None:
    logits = torch.randn(len(BRANCHY) + 1, 8, generator=torch.Generator().manual_seed(3))  # [7, 8]
    probs = torch.softmax(logits, dim=-1)  # [7, 8]
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(1234)
        runs.append([accept(BRANCHY, probs, gen).emitted for _ in range(200)])
    assert runs[0] == runs[1] and len({tuple(r) for r in runs[0]}) > 10


@pytest.mark.parametrize(
    "accept", [sample_accept, presampled, drafted_as_target], ids=["cpu", "presampled", "drafted"]
)
def test_sample_row_without_mass_raises(accept) -> None:
    gen = torch.Generator().manual_seed(0)
    no_mass = torch.stack([torch.zeros(V, dtype=torch.float64), P_A])  # [2, V]
    with pytest.raises(ValueError, match="row 0"):
        accept(DraftTree.from_chain([2]), no_mass, gen)
    certain = torch.zeros(V, dtype=torch.float64)  # [V]
    certain[0] = 1.0
    nan_leaf = torch.stack([certain, torch.full((V,), float("nan"), dtype=torch.float64)])  # [2, V]
    with pytest.raises(ValueError, match="row 1"):
        accept(DraftTree.from_chain([0]), nan_leaf, gen)


def test_sample_shape_checked() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sample_accept(DraftTree.from_chain([1]), P_ROOT[None], gen)
    with pytest.raises(ValueError):
        sample_accept(DraftTree.from_chain([1]), torch.stack([P_ROOT, P_A]), gen, P_ROOT[None])


@TOPK_PATHS
def test_sample_topk_tree_is_exact(accept) -> None:
    """(a) q = 1: three deterministic root children (one duplicate token), depth 2."""
    #          root
    #      /    |    \    \
    #   0:t2  1:t0  2:t2  3:t4        (node 2 duplicates node 0's token and must be skipped)
    #   /  \         |
    # 4:t3 5:t2     6:t1
    tree = DraftTree((2, 0, 2, 4, 3, 2, 1), (-1, -1, -1, -1, 0, 0, 2), (0.0,) * 7)
    probs = torch.stack([P_ROOT, P_A, P_B, UNIFORM, UNIFORM, UNIFORM, UNIFORM, UNIFORM])  # [8, V]
    gen = torch.Generator().manual_seed(2024)
    draws = 40_000
    results = [accept(tree, probs, gen) for _ in range(draws)]

    first = [r.emitted[0] for r in results]
    assert chi2_pvalue(first, P_ROOT) > P_VALUE_MIN
    # The token after an accepted draft follows that node's own target row.
    after_t2 = [r.emitted[1] for r in results if r.nodes[:1] == [0]]
    after_t0 = [r.emitted[1] for r in results if r.nodes[:1] == [1]]
    assert len(after_t2) > 0.9 * draws * P_ROOT[2].item()
    assert chi2_pvalue(after_t2, P_A) > P_VALUE_MIN
    assert chi2_pvalue(after_t0, P_B) > P_VALUE_MIN
    assert all(2 not in r.nodes for r in results)  # duplicate sibling never tried


@TOPK_PATHS
def test_sample_children_covering_all_mass_is_exact(accept) -> None:
    """(a') q = 1 where a row's children cover its whole support: the walk never stops there."""
    #              root (mass on t0, t1, t2 only)
    #      /     |      \      \
    #   0:t1   1:t0   2:t1   3:t2     (node 2 duplicates node 0's token)
    #            |             |
    #          4:t3          5:t4     (node 3's row is a point mass on t4)
    tree = DraftTree((1, 0, 1, 2, 3, 4), (-1, -1, -1, -1, 1, 3), (0.0,) * 6)
    top3 = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0])  # [V] float32, as processed_probs returns
    point_t4 = torch.zeros(V)  # [V]
    point_t4[4] = 1.0
    probs = torch.stack(
        [top3, P_B.float(), P_A.float(), UNIFORM.float(), point_t4, UNIFORM.float(), P_B.float()]
    )  # [7, V]
    gen = torch.Generator().manual_seed(99)
    draws = 30_000
    results = [accept(tree, probs, gen) for _ in range(draws)]

    assert all(r.accept_length >= 1 and 2 not in r.nodes for r in results)
    first = [r.emitted[0] for r in results]
    assert chi2_pvalue(first, top3[:3].double()) > P_VALUE_MIN
    after_t1 = [r.emitted[1] for r in results if r.nodes == [0]]
    after_t0 = [r.emitted[1] for r in results if r.nodes[:1] == [1]]
    via_t2 = [r for r in results if r.nodes[:1] == [3]]
    assert chi2_pvalue(after_t1, P_B) > P_VALUE_MIN
    assert chi2_pvalue(after_t0, P_A) > P_VALUE_MIN
    assert all(r.nodes == [3, 5] for r in via_t2)
    assert chi2_pvalue([r.bonus for r in via_t2], P_B) > P_VALUE_MIN


def test_presampled_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path makes one host transfer per tree and no syncing op, at any depth."""
    parents = (-1, -1, -1, 0, 0, 0, 1, 3, 3, 4, 7, 7, 9, 10, 10, 12, 13, 13, 15, 17)
    ranks = (0, 1, 0, 0, 1, 2, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0)  # node 2 duplicates node 0
    logits = 4.0 * torch.randn(len(parents) + 1, 50, generator=torch.Generator().manual_seed(8))  # [21, 50]
    probs = logits.softmax(-1)  # [21, 50]
    order = probs.argsort(-1, descending=True).tolist()
    tokens = [order[p + 1][k] for p, k in zip(parents, ranks)]
    tree = DraftTree(tokens, parents, (0.0,) * len(parents))
    gen = torch.Generator().manual_seed(5)
    depths = set()
    for _ in range(50):
        with host_reads(monkeypatch) as reads:
            res = presampled(tree, probs, gen)
        assert reads == ["tolist"]
        depths.add(res.accept_length)
    assert max(depths) >= 3


def test_sample_drafted_tree_is_exact() -> None:
    """(b) root children sampled without replacement from q, verified with draft_probs."""
    k, draws = 3, 30_000
    draft_gen = torch.Generator().manual_seed(7)
    children = torch.multinomial(Q_ROOT.expand(draws, V), k, replacement=False, generator=draft_gen)  # [draws, k]
    # Node 0 gets one deterministic child (token 5, i.e. sampled from a point mass on 5).
    parents = (-1,) * k + (0,)
    point_mass = torch.zeros(V, dtype=torch.float64)  # [V]
    point_mass[5] = 1.0
    probs = torch.stack([P_ROOT, P_A] + [UNIFORM] * k)  # [k+2, V]
    q_rows = torch.stack([Q_ROOT, point_mass] + [UNIFORM] * k)  # [k+2, V]
    verify_gen = torch.Generator().manual_seed(11)
    first: list[int] = []
    after_node0: list[int] = []
    accept_counts: Counter[bool] = Counter()
    for row in children.tolist():
        tree = DraftTree((*row, 5), parents, (0.0,) * (k + 1))
        res = sample_accept(tree, probs, verify_gen, draft_probs=q_rows)
        first.append(res.emitted[0])
        if res.nodes[:1] == [0]:
            after_node0.append(res.emitted[1])
        accept_counts[res.accept_length > 0] += 1
    assert chi2_pvalue(first, P_ROOT) > P_VALUE_MIN
    assert chi2_pvalue(after_node0, P_A) > P_VALUE_MIN
    assert accept_counts[True] > 0.5 * draws  # sanity: drafts are actually being accepted
