"""Offline replay of the hybrid drafter on distilled answers (bench/lookup_replay.py)."""

from __future__ import annotations

import json

import torch

from bench.lookup_replay import NoModel, main, replay
from drafters.corpus import CorpusIndex
from drafters.hybrid import HybridConfig, HybridDrafter
from tests.helpers import write_shard

PROMPT = [5, 6, 7, 8]
ANSWER = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


def lookup_only(corpus: CorpusIndex | None = None) -> HybridDrafter:
    return HybridDrafter(NoModel(8), HybridConfig(), corpus=corpus)


def test_without_matches_every_step_commits_one_token():
    tokens, steps = replay(lookup_only(), "r", PROMPT + ANSWER, len(PROMPT), torch.empty(0), 8)
    assert (tokens, steps) == (len(ANSWER) - 1, len(ANSWER) - 1)      # the prefill commits the first


def test_a_corpus_holding_the_answer_commits_it_in_few_steps():
    corpus = CorpusIndex.from_records([ANSWER], max_depth=6)
    tokens, steps = replay(lookup_only(corpus), "r", PROMPT + ANSWER, len(PROMPT), torch.empty(0), 8)
    # after the prefill's 11, the 1-gram has no index (min 2): one plain step commits 12, then
    # [11, 12] finds 13..18 (6 tokens) and the step commits them plus 19, then 20 is drafted.
    assert tokens == len(ANSWER) - 1 and steps == 3


def test_prompt_lookup_copies_a_repeated_span():
    ids = PROMPT + [9, 10, 5, 6, 7, 8, 9, 10]
    tokens, steps = replay(lookup_only(), "r", ids, len(PROMPT), torch.empty(0), 8)
    assert tokens == 7 and steps < 7


def test_main_holds_out_the_last_shard_and_replays_eval_folders(tmp_path):
    data, evals = tmp_path / "distill", tmp_path / "eval"
    data.mkdir()
    evals.mkdir()
    long = list(range(11, 27))                                     # 16 tokens
    write_shard(data / "shard_00000.npz", [(PROMPT, long), ([1, 2], [30, 31, 32])])
    write_shard(data / "shard_00001.npz", [(PROMPT, long)])
    write_shard(evals / "shard_00000.npz", [([3], ANSWER), ([4], [40, 41])])
    out = tmp_path / "r.json"
    report = main(["--data", str(data), "--eval", str(evals), "--drafters", "none", "--fractions", "0", "1",
                   "--budgets", "4", "8", "--save-acceptance", str(tmp_path / "ckpt"), "--out", str(out)])
    rows = {(r["folder"], r["fraction"], r["budget"]): r for r in report["results"]}
    assert len(rows) == 8 and json.loads(out.read_text()) == report and out.with_suffix(".png").is_file()
    held, whole = rows[str(data), 1.0, 8], rows[str(evals), 1.0, 8]
    assert held["records"] == 1 and whole["records"] == 2
    assert report["replayed_shards"] == {str(data): ["shard_00001.npz"], str(evals): ["shard_00000.npz"]}
    assert held["corpus_tokens"] == len(long) + 1 + 3 + 1               # shard 0's answers, each + a separator
    assert whole["tokens"] == len(ANSWER) - 1 + 1
    # no corpus: one token per step; corpus continuations of 6 tokens: 12, then 13-18 + 19, then 20-25 + 26;
    # a 4-node budget cuts them: 12, 13-16 + 17, 18-21 + 22, 23-26
    assert [rows[str(data), f, b]["steps"] for f, b in ((0.0, 8), (1.0, 8), (1.0, 4))] == [15, 3, 4]
    saved = json.loads((tmp_path / "ckpt" / "acceptance.json").read_text())      # eval folder, full corpus
    assert saved["tau_by_budget"] == {str(b): round(rows[str(evals), 1.0, b]["tokens"] / rows[str(evals), 1.0, b]
                                                    ["steps"], 4) for b in (4, 8)}
