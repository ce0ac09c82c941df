"""Self-distillation data: the target answers the training prompts itself, through the engine.

``treespec distill`` renders each prompt with the target's chat template and generates the answer
with continuous batching (``--max-num-seqs`` in flight): greedy for most records and sampled at
``--temperature`` / ``--top-p`` for a ``--sample-share`` of them (chosen per record from the seed,
so a rerun makes the same choice). Records are shuffled with ``--seed`` and cut into shards of
``--shard-size``; each finished shard is written at once as a compressed ``shard_00000.npz``::

    tokens       uint16/int32 [N]   prompt + answer token ids of every record, concatenated
    offsets      int64 [R + 1]      record r is tokens[offsets[r]:offsets[r + 1]]
    prompt_lens  int32 [R]          the first prompt_lens[r] tokens of a record are the prompt
    temperature  float32 [R]        0 = greedy
    record_ids   str [R]            ``id`` of the source record
    finish       str [R]            stop (EOS) or length

A rerun skips finished shards (resumable); ``meta.json`` holds the settings and per-shard counts.
``drafters/train/features.py`` reads such a folder as training data (``--data <folder>``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)
META_FILE = "meta.json"
_RUN_KEYS = ("data", "seed", "shard_size", "max_new_tokens", "max_prompt_len", "sample_share", "temperature",
             "top_p")


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a one-turn user prompt rendered with the chat template (assistant turn opened)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def is_sampled(seed: int, record_id: str, share: float) -> bool:
    """Whether a record is answered by sampling (stable per seed and record id)."""
    return random.Random(f"{seed}:{record_id}").random() < share


def shard_path(out: Path, index: int) -> Path:
    return out / f"shard_{index:05d}.npz"


def distill_shards(out: str | Path) -> list[Path]:
    return sorted(Path(out).glob("shard_*.npz"))


@dataclass
class _Shard:
    """Records of one shard in flight: their prompt ids and, once finished, their answers."""

    index: int
    records: list[dict[str, Any]]
    prompts: list[list[int]]
    temperatures: list[float]
    answers: dict[int, tuple[list[int], str]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return len(self.answers) == len(self.records)

    def arrays(self, vocab_size: int) -> dict[str, np.ndarray]:
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        seqs = [self.prompts[i] + self.answers[i][0] for i in range(len(self.records))]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        return {
            "tokens": np.array([t for s in seqs for t in s], dtype=dtype),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "prompt_lens": np.array([len(p) for p in self.prompts], dtype=np.int32),
            "temperature": np.array(self.temperatures, dtype=np.float32),
            "record_ids": np.array([str(r.get("id", "")) for r in self.records]),
            "finish": np.array([self.answers[i][1] for i in range(len(self.records))]),
        }


def read_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL of prompts (``prompt``, ``id``), or of a Spec-Bench question file
    (``bench.questions``: each question's first turn, its ``question_id`` as ``id``)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if records and "prompt" not in records[0] and "turns" in records[0]:
        from bench.questions import load_questions

        return [{"id": str(q.question_id), "source": q.category, "prompt": q.turns[0]} for q in load_questions(path)]
    if bad := next((r for r in records if "prompt" not in r), None):
        raise ValueError(f"{path}: a record has neither `prompt` nor Spec-Bench `turns` (keys: {sorted(bad)})")
    return records


def load_prompts(path: str | Path, tokenizer: Any, seed: int, max_prompt_len: int, limit: int | None
                 ) -> list[tuple[dict[str, Any], list[int]]]:
    """Shuffled records whose rendered prompt has at most ``max_prompt_len`` tokens, with their ids. A
    Spec-Bench question (``question_id``, ``category``, ``turns``) counts as a record of its first turn."""
    records = read_prompt_records(path)
    random.Random(seed).shuffle(records)
    kept = []
    for r in records:
        ids = chat_prompt_ids(tokenizer, r["prompt"])
        if len(ids) <= max_prompt_len:
            kept.append((r, ids))
        if limit and len(kept) == limit:
            break
    return kept


def _check_meta(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The folder's meta (new if absent); raises if it was written by a run with other settings."""
    meta_file = out / META_FILE
    if not meta_file.is_file():
        return {**run, "shards": {}}
    meta = json.loads(meta_file.read_text())
    differs = {k: (meta.get(k), run[k]) for k in _RUN_KEYS if meta.get(k) != run[k]}
    if differs:
        raise ValueError(f"{out} holds another distillation run {differs}; use a new --out folder")
    return meta


def _write_shard(out: Path, shard: _Shard, vocab_size: int, meta: dict[str, Any]) -> None:
    path = shard_path(out, shard.index)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **shard.arrays(vocab_size))
    os.replace(tmp, path)
    answers = [a for a, _ in shard.answers.values()]
    meta["shards"][path.name] = {
        "records": len(shard.records), "prompt_tokens": sum(len(p) for p in shard.prompts),
        "answer_tokens": sum(len(a) for a in answers), "sampled": sum(t > 0 for t in shard.temperatures),
        "stopped": sum(reason == "stop" for _, reason in shard.answers.values()),
        "latency_s": round(time.monotonic() - shard.started, 1)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def summarize(meta: dict[str, Any]) -> dict[str, Any]:
    """Totals over the finished shards; throughput over the runs' wall time (shards overlap in flight)."""
    shards = meta["shards"].values()
    total = {k: sum(s[k] for s in shards) for k in ("records", "prompt_tokens", "answer_tokens", "sampled",
                                                     "stopped")}
    total["shards"] = len(meta["shards"])
    runs = meta.get("runs", [])
    total["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    total["answer_tokens_per_s"] = round(sum(r["answer_tokens"] for r in runs) / max(total["wall_s"], 1e-9), 1)
    total["mean_answer_tokens"] = round(total["answer_tokens"] / max(total["records"], 1), 1)
    return total


def distill(engine: Any, data: str | Path, out: str | Path, *, seed: int = 0, shard_size: int = 256,
            max_new_tokens: int = 384, max_prompt_len: int = 1024, sample_share: float = 0.25,
            temperature: float = 0.7, top_p: float = 1.0, limit: int | None = None,
            max_shards: int | None = None, max_minutes: float | None = None) -> dict[str, Any]:
    """Generate every missing shard (at most ``max_shards`` this run, stopping at a shard boundary after
    ``max_minutes``); returns the totals over all finished shards."""
    from server.engine.request import SamplingParams

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"data": Path(data).name, "seed": seed, "shard_size": shard_size, "max_new_tokens": max_new_tokens,
           "max_prompt_len": max_prompt_len, "sample_share": sample_share, "temperature": temperature,
           "top_p": top_p}
    meta = _check_meta(out, run)
    prompts = load_prompts(data, engine.tokenizer, seed, max_prompt_len, limit)
    todo = [i for i in range(-(-len(prompts) // shard_size)) if not shard_path(out, i).is_file()]
    todo = todo[:max_shards] if max_shards is not None else todo
    vocab = len(engine.tokenizer)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
    pending: list[_Shard] = []
    owner: dict[str, tuple[_Shard, int]] = {}

    def submit(index: int) -> None:
        chunk = prompts[index * shard_size:(index + 1) * shard_size]
        temps = [temperature if is_sampled(seed, str(r.get("id", j)), sample_share) else 0.0
                 for j, (r, _) in enumerate(chunk)]
        shard = _Shard(index, [r for r, _ in chunk], [ids for _, ids in chunk], temps)
        for j, ids in enumerate(shard.prompts):
            rid = f"s{index}-{j}"
            params = SamplingParams(max_tokens=max_new_tokens, temperature=temps[j], top_p=top_p,
                                    seed=seed * 1_000_003 + index * shard_size + j)
            engine.add_request(rid, ids, params)
            owner[rid] = (shard, j)
        pending.append(shard)

    queue = list(todo)
    answers: dict[str, list[int]] = {}
    run_log = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(engine.runner.device),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_s": 0.0, "answer_tokens": 0}
    meta.setdefault("runs", []).append(run_log)
    t0 = time.monotonic()
    with tqdm(total=len(todo) * shard_size, desc="distill", unit="rec") as bar:
        while engine.has_unfinished() or (queue and not past(deadline)):   # past the deadline: finish, stop
            if queue and not engine.scheduler.waiting and not past(deadline):
                submit(queue.pop(0))
            outputs, stats = engine.step()
            for o in outputs:
                answers.setdefault(o.request_id, []).extend(o.token_ids)
                if o.finished:
                    shard, j = owner.pop(o.request_id)
                    shard.answers[j] = (answers.pop(o.request_id), o.finish_reason)
                    bar.update(1)
            step_rate = stats.num_generation_tokens / max(stats.step_time, 1e-9)
            bar.set_postfix(running=stats.num_running, tok_s=f"{step_rate:.0f}")
            for shard in [s for s in pending if s.done]:
                run_log["wall_s"] = round(time.monotonic() - t0, 1)
                run_log["answer_tokens"] += sum(len(a) for a, _ in shard.answers.values())
                _write_shard(out, shard, vocab, meta)
                pending.remove(shard)
                name = shard_path(out, shard.index).name
                log.info("wrote %s: %s", name, meta["shards"][name])
    summary = summarize(meta)
    meta["summary"] = summary
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return summary


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def add_distill_flags(parser: argparse.ArgumentParser) -> None:
    """``treespec distill`` flags (the engine's own flags come from ``ServerConfig``)."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--data", required=True, help="JSONL with a `prompt` (and `id`) per record, or "
                   "Spec-Bench questions (first turns)")
    g.add_argument("--out", required=True, help="folder for the shards and meta.json (resumable)")
    g.add_argument("--seed", type=int, default=0, help="record shuffle, sampled share and sampling seeds")
    g.add_argument("--shard-size", type=int, default=256, help="records per shard")
    g.add_argument("--max-new-tokens", type=int, default=384, help="answer length cap")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="skip prompts longer than this (tokens)")
    g.add_argument("--sample-share", type=float, default=0.25, help="share of records answered by sampling")
    g.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled share")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p of the sampled share")
    g.add_argument("--limit", type=int, default=None, help="use the first N kept prompts")
    g.add_argument("--max-shards", type=int, default=None, help="generate at most N new shards this run")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop submitting shards after N minutes (finishes those in flight)")


def run_distill(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Build a drafter-free engine from ``cfg`` (a ``ServerConfig``) and distill with ``args``."""
    from server.build import build_engine

    engine, _ = build_engine(cfg.model_copy(update={"drafter": "none"}))
    summary = distill(engine, args.data, args.out, seed=args.seed, shard_size=args.shard_size,
                      max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                      sample_share=args.sample_share, temperature=args.temperature, top_p=args.top_p,
                      limit=args.limit, max_shards=args.max_shards, max_minutes=args.max_minutes)
    print(json.dumps(summary, indent=2))
    return summary
