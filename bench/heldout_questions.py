"""Spec-Bench-format questions from the held-out self-distillation records (in-domain prompts).

Drafters train on the target's answers to ``train_prompts.jsonl`` (code, math word problems,
role-play, tool use) with the last shard held out. Benchmarking on that shard's prompts next to
MT-bench separates what a drafter learned from how far it carries to other domains::

    python -m bench.heldout_questions --distill drafters/data/smollm2-distill --shard 14 \\
        --prompts ../shared/data/train_prompts.jsonl --out .cache/heldout_questions.jsonl
    treespec bench --questions .cache/heldout_questions.jsonl --per-category 4 ...

Only greedy records are kept (the benchmark decodes greedily); ``category`` is the record's source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from drafters.train.features import load_records


def heldout_questions(distill: str | Path, shard: int, prompts: str | Path) -> list[dict]:
    """One question per greedy record of ``shard``, in shard order."""
    path = Path(distill) / f"shard_{shard:05d}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no distillation shard {path}")
    data = np.load(path)
    wanted = [str(r) for r, t in zip(data["record_ids"], data["temperature"]) if t == 0]
    by_id = {rec["id"]: rec for rec in load_records(prompts, None, 0)}
    missing = [r for r in wanted if r not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} records of {path} are not in {prompts} (first: {missing[0]})")
    return [{"question_id": r, "category": by_id[r]["source"], "turns": [by_id[r]["prompt"]]} for r in wanted]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--distill", required=True, help="self-distillation folder (treespec distill --out)")
    parser.add_argument("--shard", type=int, required=True, help="the held-out shard's index")
    parser.add_argument("--prompts", required=True, help="the training prompts file the shard was made from")
    parser.add_argument("--out", required=True, help="Spec-Bench-format JSONL to write")
    args = parser.parse_args(argv)
    questions = heldout_questions(args.distill, args.shard, args.prompts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(q) + "\n" for q in questions))
    print(f"wrote {len(questions)} questions to {args.out}")


if __name__ == "__main__":
    main()
