"""The per-step tree-trimming rule of the offline study (bench/tree_trim.py)."""

from __future__ import annotations

import math

import torch

from bench.lookup_replay import NoModel
from bench.tree_trim import trim_size, trimmed_replay
from drafters.hybrid import HybridConfig, HybridDrafter

SIZES, FLAT, STEEP = [0, 16], [0.040, 0.040], [0.040, 0.200]


def test_free_nodes_are_all_verified():
    assert trim_size([math.log(0.1)] * 5, SIZES, FLAT, 0.005) == 5


def test_costly_unlikely_nodes_are_dropped_and_likely_ones_kept():
    assert trim_size([math.log(0.01)] * 8, SIZES, STEEP, 0.005) == 0
    # each node costs 10 ms on a 45 ms step: worth it at p 0.9, 0.81, ... while the rate still grows
    chain = [k * math.log(0.9) for k in range(1, 9)]
    assert trim_size(chain, SIZES, STEEP, 0.005) == 6          # 5.22 tokens / 105 ms beats 5 and 7 nodes


def test_a_replay_trimmed_to_no_nodes_commits_one_token_a_step():
    ids = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10]                     # the answer repeats the prompt: lookup drafts it
    drafter = HybridDrafter(NoModel(8), HybridConfig())
    full, sizes = trimmed_replay(drafter, "r", ids, 4, torch.empty(0), 8, len)
    none, zeros = trimmed_replay(drafter, "r", ids, 4, torch.empty(0), 8, lambda tree: 0)
    assert full == none == len(ids) - 5
    assert len(sizes) < full and max(sizes) > 0
    assert zeros == [0] * full
