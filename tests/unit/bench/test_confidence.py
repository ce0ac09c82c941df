"""The drafter-confidence reliability table (bench/confidence.py)."""

from __future__ import annotations

import math

import pytest

from bench.confidence import judged_nodes, table
from drafters.tree import DraftTree


def test_only_nodes_below_accepted_parents_are_judged():
    # root children 7 (p .5) and 8 (p .25); below 7: 9 (p .5); below 8: 10 (never judged: 8 is wrong)
    tree = DraftTree((7, 8, 9, 10), (-1, -1, 0, 1), (math.log(0.5), math.log(0.25), math.log(0.25), math.log(0.125)))
    rows = judged_nodes(tree, [7, 3])
    assert [(d, ok) for d, _, ok in rows] == [(1, True), (1, False), (2, False)]
    assert [p for _, p, _ in rows] == pytest.approx([0.5, 0.25, 0.5])


def test_nodes_past_the_answer_are_not_judged():
    tree = DraftTree.from_chain([7, 8], [math.log(0.9), math.log(0.81)])
    assert [d for d, _, _ in judged_nodes(tree, [7])] == [1]


def test_table_bins_by_depth_and_probability():
    bins = table([(1, 0.95, True), (1, 0.92, False), (1, 0.05, False), (2, 0.95, True)])
    top = next(b for b in bins if b["depth"] == 1 and b["bin"][0] == pytest.approx(0.9))
    assert top["nodes"] == 2 and top["accept"] == 0.5 and top["mean_p"] == pytest.approx(0.935)
    assert {b["depth"] for b in bins} == {1, 2}
