"""Offline Medusa tree simulation (bench/medusa_trees.py) and held-out question files (bench/heldout_questions.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.heldout_questions import heldout_questions
from bench.medusa_trees import trees_for


def test_tree_shapes_share_the_candidates_and_respect_the_budget():
    logits = np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]])                         # [D=2, K=3]
    ids = np.array([[10, 11, 12], [20, 21, 22]])
    logprobs = np.log(np.array([[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]]))
    paths = [(0,), (1,), (0, 0)]
    for shape in ("dynamic", "dynamic_full", "static"):
        tree = trees_for(shape, logits, logprobs, ids, 3, paths)
        assert len(tree.tokens) == 3 and tree.tokens[0] == 10
    full = trees_for("dynamic_full", logits, logprobs, ids, 3, paths)
    assert full.tokens == (10, 20, 11)                 # 0.5, 0.45 (= 0.5 * 0.9), 0.2
    assert trees_for("static", logits, logprobs, ids, 2, paths).tokens == (10, 11)


def test_heldout_questions_keep_the_greedy_records_of_the_shard(tmp_path):
    np.savez_compressed(tmp_path / "shard_00003.npz", record_ids=np.array(["a", "b", "c"]),
                        temperature=np.array([0.0, 0.7, 0.0], dtype=np.float32))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "source": s, "prompt": f"say {i}\u2028!", "response": "x"}) + "\n"
                               for i, s in (("a", "code"), ("b", "math"), ("c", "math"), ("d", "code"))))
    got = heldout_questions(tmp_path, 3, prompts)
    assert got == [{"question_id": "a", "category": "code", "turns": ["say a\u2028!"]},
                   {"question_id": "c", "category": "math", "turns": ["say c\u2028!"]}]
    with pytest.raises(FileNotFoundError):
        heldout_questions(tmp_path, 4, prompts)
    prompts.write_text(json.dumps({"id": "a", "source": "code", "prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match="not in"):
        heldout_questions(tmp_path, 3, prompts)
