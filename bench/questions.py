"""Spec-Bench-format question files: one JSON object per line with question_id, category, turns."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


def load_questions(path: str | Path, limit: int | None = None, categories: list[str] | None = None,
                   per_category: int | None = None) -> list[Question]:
    """Parse and validate; raises ValueError naming the line on malformed input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {path} does not exist")
    out: list[Question] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
        missing = [k for k in ("question_id", "category", "turns") if k not in obj]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{lineno}: 'turns' must be a non-empty list of strings")
        q = Question(obj["question_id"], str(obj["category"]), tuple(turns))
        if categories and q.category not in categories:
            continue
        out.append(q)
    if categories:
        unknown = set(categories) - {q.category for q in out}
        if unknown:
            raise ValueError(f"no questions in categories {sorted(unknown)}")
    if per_category:
        counts: Counter[str] = Counter()
        kept = []
        for q in out:
            counts[q.category] += 1
            if counts[q.category] <= per_category:
                kept.append(q)
        out = kept
    return out[:limit] if limit else out
