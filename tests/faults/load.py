"""Load generator of the fault-injection suite: many mixed requests at once, some streams dropped
mid-way, a few long prompts arriving mid-run; every response is recorded with its chunk arrival times.

A ``Spec`` is what a request asks (endpoint, prompt, max_tokens, temperature, seed): requests with
the same spec must get the same output, however they are sent (streamed or not) and whatever runs
beside them. A ``Job`` is one request of the run: a spec, streamed or not, maybe dropped after a few
chunks. ``run_job`` sends one and returns its ``Result``; ``problems`` lists what is wrong with it on its
own, ``mismatch`` how it differs from the solo run of its spec.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TRAIN_PROMPTS = ROOT.parent / "shared" / "data" / "train_prompts.jsonl"
FINISH_REASONS = ("stop", "length")


def _env(name: str, default, kind=int):
    raw = os.environ.get(f"TREESPEC_FAULTS_{name}")
    return default if raw in (None, "") else kind(raw)


def _span(raw: str) -> tuple[int, int]:
    lo, _, hi = raw.partition("-")
    return int(lo), int(hi or lo)


@dataclass(frozen=True)
class FaultConfig:
    """Sizes of the run; each has an env var ``TREESPEC_FAULTS_<NAME>`` (spans as ``LO-HI``)."""

    n: int = 500                                # requests of the load phase, long prompts included
    concurrency: int = 64                       # requests in flight at once
    distinct: int = 48                          # distinct short specs (each replayed alone afterwards)
    max_tokens: tuple[int, int] = (8, 32)       # per short request, uniform
    disconnect: float = 0.15                    # fraction of streams dropped after 1-4 token chunks
    long: int = 4                               # long prompts, spread over the run
    long_tokens: tuple[int, int] = (3000, 4000)  # their prompt length in tokens
    kv_blocks: int = 272                        # KV pool (blocks of 16): a long prompt and little else
    max_num_seqs: int = 16
    max_gap_s: float = 10.0                     # bound on the inter-chunk gap while a long prompt prefills
    drain_streams: int = 8                      # streams in flight at the SIGTERM
    drain_exit_s: float = 60.0                  # bound on the time from SIGTERM to the exit
    seed: int = 0
    server_args: str = ""                       # extra `treespec serve` flags (e.g. --calibrate-tree false)
    out: str = ""                               # report path (default bench/results/faults/faults_n<N>.json)

    @classmethod
    def from_env(cls) -> FaultConfig:
        parse = {int: int, float: float, str: str, tuple: _span}
        return cls(**{f.name: _env(f.name.upper(), f.default, parse[type(f.default)]) for f in fields(cls)})

    @property
    def report_path(self) -> Path:
        return Path(self.out) if self.out else ROOT / "bench" / "results" / "faults" / f"faults_n{self.n}.json"


@dataclass(frozen=True)
class Spec:
    chat: bool
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    long: bool = False

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"

    @property
    def kind(self) -> str:
        return f"{'chat' if self.chat else 'completions'}/{'seeded' if self.temperature else 'greedy'}"

    def body(self, model: str, stream: bool) -> dict:
        body = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature, "stream": stream}
        if self.seed is not None:
            body["seed"] = self.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.chat:
            return body | {"messages": [{"role": "user", "content": self.prompt}]}
        return body | {"prompt": self.prompt}


@dataclass(frozen=True)
class Job:
    index: int
    spec: Spec
    stream: bool
    drop_after: int | None = None     # close the stream after this many token chunks


@dataclass
class Result:
    job: Job
    status: int | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    start: float = 0.0
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)   # arrival of each chunk with text or a finish
    finishes: int = 0             # chunks (or choices) with a finish_reason
    dones: int = 0                # data: [DONE] events
    usages: int = 0               # usage chunks
    dropped: bool = False         # the client closed the stream before its end
    errors: list[str] = field(default_factory=list)

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None


def load_prompts(path: Path = TRAIN_PROMPTS) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def make_specs(cfg: FaultConfig, prompts: list[str], tokenizer) -> tuple[list[Spec], list[Spec]]:
    """(short specs, long specs): short ones from short training prompts, half greedy, half seeded
    sampling; long ones greedy, glued from consecutive prompts and cut to a drawn token count."""
    rng = random.Random(cfg.seed)
    short = [p for p in prompts if 40 <= len(p) <= 300]
    specs = []
    for _ in range(cfg.distinct):
        sampled = rng.random() < 0.5
        specs.append(Spec(chat=rng.random() < 0.5, prompt=rng.choice(short), max_tokens=rng.randint(*cfg.max_tokens),
                          temperature=0.8 if sampled else 0.0, seed=rng.randrange(2**31) if sampled else None))
    long = []
    for _ in range(cfg.long):
        target, start = rng.randint(*cfg.long_tokens), rng.randrange(len(prompts))
        ids: list[int] = []
        while len(ids) < target:
            ids += tokenizer.encode(prompts[start % len(prompts)] + "\n\n", add_special_tokens=False)
            start += 1
        text = "Summarize the following notes in one sentence.\n\n" + tokenizer.decode(ids[:target])
        long.append(Spec(chat=rng.random() < 0.5, prompt=text, max_tokens=16, long=True))
    return specs, long


def make_jobs(cfg: FaultConfig, specs: list[Spec], long: list[Spec]) -> list[Job]:
    """``cfg.n`` jobs: the long specs (streamed) evenly spread, the rest drawn from ``specs``."""
    rng = random.Random(cfg.seed + 1)
    at_long = {round((k + 1) * cfg.n / (len(long) + 1)): spec for k, spec in enumerate(long)}
    jobs = []
    for i in range(cfg.n):
        if i in at_long:
            jobs.append(Job(i, at_long[i], stream=True))
            continue
        stream = rng.random() < 0.5
        drop = rng.randint(1, 4) if stream and rng.random() < cfg.disconnect else None
        jobs.append(Job(i, rng.choice(specs), stream, drop))
    return jobs


def _choice_text(choice: dict, chat: bool, stream: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    return (choice.get("delta" if stream else "message") or {}).get("content") or ""


async def run_job(client: httpx.AsyncClient, model: str, job: Job, on_token=None) -> Result:
    """Send ``job``; ``on_token(result)`` is called at each token chunk of a stream."""
    res = Result(job, start=time.monotonic())
    body = job.spec.body(model, job.stream)
    try:
        if not job.stream:
            r = await client.post(job.spec.path, json=body)
            res.status = r.status_code
            if r.status_code == 200:
                data = r.json()
                (choice,) = data["choices"]
                res.text = _choice_text(choice, job.spec.chat, False)
                res.finish_reason = choice["finish_reason"]
                res.finishes = int(res.finish_reason is not None)
                res.completion_tokens = data["usage"]["completion_tokens"]
                res.prompt_tokens = data["usage"]["prompt_tokens"]
            else:
                res.errors.append(f"HTTP {r.status_code}: {r.text[:300]}")
        else:
            async with client.stream("POST", job.spec.path, json=body) as r:
                res.status = r.status_code
                if r.status_code != 200:
                    res.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                else:
                    await _read_stream(r, job, res, on_token)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        res.errors.append(f"{type(exc).__name__}: {exc}")
    res.end = time.monotonic()
    return res


async def _read_stream(r: httpx.Response, job: Job, res: Result, on_token) -> None:
    ids = set()
    async for line in r.aiter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            res.errors.append(f"not an SSE data line: {line[:100]!r}")
            continue
        payload = line.removeprefix("data: ")
        if res.dones:
            res.errors.append(f"event after [DONE]: {payload[:100]}")
        if payload == "[DONE]":
            res.dones += 1
            continue
        chunk = json.loads(payload)
        if "error" in chunk:
            res.errors.append(f"error event: {chunk['error']}")
            continue
        ids.add(chunk["id"])
        if chunk.get("usage"):
            res.usages += 1
            res.completion_tokens = chunk["usage"]["completion_tokens"]
            res.prompt_tokens = chunk["usage"]["prompt_tokens"]
        for choice in chunk["choices"]:
            text = _choice_text(choice, job.spec.chat, True)
            res.text += text
            if choice.get("finish_reason") is not None:
                res.finishes += 1
                res.finish_reason = choice["finish_reason"]
            if text or choice.get("finish_reason") is not None:
                res.token_times.append(time.monotonic())
                if on_token is not None:
                    on_token(res)
        if job.drop_after is not None and len(res.token_times) >= job.drop_after and not res.finishes:
            res.dropped = True           # leaving the `async with` closes the connection mid-stream
            return
    if len(ids) > 1:
        res.errors.append(f"chunks of one stream carry {len(ids)} ids")


async def run_load(url: str, model: str, jobs: list[Job], concurrency: int) -> list[Result]:
    """All ``jobs``, at most ``concurrency`` in flight, started in order."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0, connect=30.0), limits=limits) as client:
        async def one(job: Job) -> Result:
            async with gate:
                return await run_job(client, model, job)

        return list(await asyncio.gather(*(one(j) for j in jobs)))


def problems(res: Result) -> list[str]:
    """What is wrong with ``res`` on its own: an error, a lost or duplicated finish, [DONE] or usage."""
    out = list(res.errors)
    if res.status != 200:
        return out or [f"status {res.status}"]
    if not res.dropped and (res.finishes != 1 or res.finish_reason not in FINISH_REASONS):
        out.append(f"{res.finishes} finish_reasons (last {res.finish_reason!r})")
    if not res.dropped and res.job.stream and (res.dones, res.usages) != (1, 1):
        out.append(f"stream ended with {res.dones} [DONE] and {res.usages} usage chunks")
    return out


def mismatch(res: Result, solo: Result) -> str | None:
    """How ``res`` differs from its spec's solo run (text, completion tokens, finish_reason), if it does;
    a dropped stream's text must be the start of the solo text."""
    if res.status != 200 or solo.status != 200:
        return None
    if res.dropped:
        ok = solo.text.startswith(res.text)
        return None if ok else f"dropped stream text {res.text!r} does not start the solo text {solo.text!r}"
    got = (res.text, res.completion_tokens, res.finish_reason)
    want = (solo.text, solo.completion_tokens, solo.finish_reason)
    return None if got == want else f"{got!r} != solo {want!r}"


def gaps(results: list[Result], windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(gaps between consecutive token chunks of every stream, those of them overlapping a window)."""
    every, inside = [], []
    for res in results:
        for a, b in zip(res.token_times, res.token_times[1:]):
            every.append(b - a)
            if any(a < hi and b > lo for lo, hi in windows):
                inside.append(b - a)
    return every, inside


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]
