"""Timed generation: the engine at a given concurrency, and Hugging Face ``generate`` as the peer."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from server.engine.llm_engine import LLMEngine
from server.engine.request import SamplingParams


@dataclass
class Row:
    """One question's generation under one method."""

    question_id: int | str
    category: str
    token_ids: list[int] = field(default_factory=list)
    wall_time: float = 0.0
    verify_steps: int = 0
    accepted_tokens: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    start: float = 0.0

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time if self.wall_time > 0 else 0.0


@dataclass
class StepProfile:
    """Engine steps of one run: count and summed seconds per runner phase."""

    steps: int = 0
    total: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, step_time: float, timings: dict[str, float]) -> None:
        self.steps += 1
        self.total += step_time
        for k, v in timings.items():
            self.phases[k] = self.phases.get(k, 0.0) + v

    def mean_ms(self) -> dict[str, float]:
        """Mean milliseconds per engine step: draft, forward, accept, and the rest (scheduling, detokenizing)."""
        if not self.steps:
            return {}
        out = {k: 1000 * v / self.steps for k, v in self.phases.items()}
        out["scheduler_and_output"] = 1000 * (self.total - sum(self.phases.values())) / self.steps
        out["total"] = 1000 * self.total / self.steps
        return out


def run_engine(engine: LLMEngine, prompts: list[tuple[object, str, list[int]]], max_new_tokens: int,
               concurrency: int, desc: str, profile: StepProfile | None = None) -> tuple[list[Row], float]:
    """Greedy-generate every prompt keeping ``concurrency`` in flight; returns rows and total wall time."""
    pending = deque(prompts)
    active: dict[str, Row] = {}
    rows: list[Row] = []
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, unit="q", leave=False) as bar:
        while pending or active:
            while pending and len(active) < concurrency:
                qid, cat, ids = pending.popleft()
                rid = f"bench-{qid}-{len(rows) + len(active)}"
                engine.add_request(rid, ids, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
                active[rid] = Row(qid, cat, start=time.perf_counter())
            outputs, stats = engine.step()
            now = time.perf_counter()
            if profile is not None:
                profile.add(stats.step_time, stats.timings)
            for out in outputs:
                row = active[out.request_id]
                row.token_ids.extend(out.token_ids)
                row.verify_steps, row.accepted_tokens = out.verify_steps, out.accepted_tokens
                if out.token_ids:
                    row.accept_lengths.append(len(out.token_ids))
                if out.finished:
                    row.wall_time = now - row.start
                    rows.append(active.pop(out.request_id))
                    bar.update()
    return rows, time.perf_counter() - t0


def run_hf(model, prompts: list[tuple[object, str, list[int]]], max_new_tokens: int, eos: list[int],
           desc: str) -> tuple[list[Row], float]:
    """Hugging Face ``generate`` (greedy, batch 1) on the same prompts: the peer row."""
    rows = []
    t0 = time.perf_counter()
    for qid, cat, ids in tqdm(prompts, desc=desc, unit="q", leave=False):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos[0])
        row = Row(qid, cat, token_ids=out[0, len(ids):].tolist(), wall_time=time.perf_counter() - start)
        rows.append(row)
    return rows, time.perf_counter() - t0
