"""Spec-Bench question files: parsing, filtering, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.questions import load_questions

MT_BENCH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mt_bench.jsonl"


def write(tmp_path, lines) -> Path:
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return p


def test_parses_filters_and_limits(tmp_path):
    p = write(tmp_path, [{"question_id": 1, "category": "math", "turns": ["a", "b"]},
                         {"question_id": 2, "category": "code", "turns": ["c"]},
                         "",
                         {"question_id": 3, "category": "math", "turns": ["d"], "reference": ["x"]}])
    qs = load_questions(p)
    assert [q.question_id for q in qs] == [1, 2, 3] and qs[0].turns == ("a", "b")
    assert [q.question_id for q in load_questions(p, categories=["math"])] == [1, 3]
    assert len(load_questions(p, limit=2)) == 2


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ({"question_id": 1, "turns": ["a"]}, "missing field"),
    ({"question_id": 1, "category": "x", "turns": []}, "non-empty list"),
    ({"question_id": 1, "category": "x", "turns": "a"}, "non-empty list"),
])
def test_malformed_lines_name_the_line(tmp_path, line, message):
    p = write(tmp_path, [{"question_id": 0, "category": "x", "turns": ["ok"]}, line])
    with pytest.raises(ValueError, match=f"q.jsonl:2: .*{message}"):
        load_questions(p)


def test_unknown_category_and_missing_file(tmp_path):
    p = write(tmp_path, [{"question_id": 0, "category": "x", "turns": ["ok"]}])
    with pytest.raises(ValueError, match="no questions in categories"):
        load_questions(p, categories=["nope"])
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not MT_BENCH.exists(), reason="shared data not present")
def test_shared_mt_bench_loads():
    qs = load_questions(MT_BENCH)
    assert len(qs) == 80 and len({q.category for q in qs}) == 8 and all(len(q.turns) == 2 for q in qs)
