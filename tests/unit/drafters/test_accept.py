"""Greedy and lossless-sampling tree verification (drafters/accept.py).

The sampling tests are chi-square exactness checks: whatever the draft tree, the first token
emitted in a round (first accepted draft, else the bonus) must be distributed as the target's
row 0, and the token after an accepted draft as the target's row for that draft node.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from drafters.accept import AcceptResult, greedy_accept, sample_accept
from drafters.tree import DraftTree

V = 6
P_ROOT = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.10, 0.08], dtype=torch.float64)  # [V]
P_A = torch.tensor([0.05, 0.10, 0.40, 0.20, 0.15, 0.10], dtype=torch.float64)  # [V]
P_B = torch.tensor([0.20, 0.20, 0.10, 0.10, 0.30, 0.10], dtype=torch.float64)  # [V]
UNIFORM = torch.full((V,), 1.0 / V, dtype=torch.float64)  # [V]
Q_ROOT = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.05, 0.15], dtype=torch.float64)  # [V]
P_VALUE_MIN = 1e-3


def chi2_sf(stat: float, dof: int) -> float:
    """Chi-square survival function ``Q(dof/2, stat/2)`` (regularized upper incomplete gamma)."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0.0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi2_pvalue(samples: list[int], probs: torch.Tensor) -> float:
    """Pearson goodness-of-fit p-value of integer ``samples`` against ``probs``.  # probs [V]"""
    counts = Counter(samples)
    n = len(samples)
    expected = (probs * n).tolist()
    assert min(expected) >= 5.0, "too few draws for the chi-square approximation"
    stat = sum((counts.get(v, 0) - e) ** 2 / e for v, e in enumerate(expected))
    return chi2_sf(stat, len(expected) - 1)


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


def test_sample_deterministic_edge_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.zeros(3, V, dtype=torch.float64)  # [n+1, V]
    one_hot[0, 2] = one_hot[1, 4] = one_hot[2, 1] = 1.0
    res = sample_accept(DraftTree.from_chain([2, 4]), one_hot, gen)
    assert res == AcceptResult([0, 1], [2, 4], 1)
    res = sample_accept(DraftTree.from_chain([3, 4]), one_hot, gen)
    assert res == AcceptResult([], [], 2)
    # q == p: every first child is accepted.
    res = sample_accept(DraftTree.from_chain([2, 4]), one_hot, gen, draft_probs=one_hot)
    assert res.nodes == [0, 1]


def test_sample_reproducible_with_seed() -> None:
    logits = torch.randn(len(BRANCHY) + 1, 8, generator=torch.Generator().manual_seed(3))  # [7, 8]
    probs = torch.softmax(logits, dim=-1)  # [7, 8]
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(1234)
        runs.append([sample_accept(BRANCHY, probs, gen).emitted for _ in range(200)])
    assert runs[0] == runs[1]


def test_sample_shape_checked() -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sample_accept(DraftTree.from_chain([1]), P_ROOT[None], gen)
    with pytest.raises(ValueError):
        sample_accept(DraftTree.from_chain([1]), torch.stack([P_ROOT, P_A]), gen, P_ROOT[None])


def test_sample_topk_tree_is_exact() -> None:
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
    results = [sample_accept(tree, probs, gen) for _ in range(draws)]

    first = [r.emitted[0] for r in results]
    assert chi2_pvalue(first, P_ROOT) > P_VALUE_MIN
    # The token after an accepted draft follows that node's own target row.
    after_t2 = [r.emitted[1] for r in results if r.nodes[:1] == [0]]
    after_t0 = [r.emitted[1] for r in results if r.nodes[:1] == [1]]
    assert len(after_t2) > 0.9 * draws * P_ROOT[2].item()
    assert chi2_pvalue(after_t2, P_A) > P_VALUE_MIN
    assert chi2_pvalue(after_t0, P_B) > P_VALUE_MIN
    assert all(2 not in r.nodes for r in results)  # duplicate sibling never tried


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
