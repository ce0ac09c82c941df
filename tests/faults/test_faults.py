"""Fault injection against a real ``treespec serve`` with a KV pool too small for its load (``make test-faults``).

The load phase (the ``load`` fixture, run once): ``n`` requests, ``concurrency`` at once, mixed
chat/text completions, streamed or not, greedy or seeded sampling, short outputs; some streams are
dropped after a few chunks, and a few 3-4k-token prompts arrive mid-run, so the KV pool runs out and
requests are preempted. Then every spec is replayed alone. Each test checks one property:
- nothing is lost, duplicated or failed: every response is a 200 with one finish_reason, every stream
  has one [DONE] and one usage chunk, no error event (so no 5xx);
- greedy, and seeded sampled, outputs equal their spec's solo replay (text, completion tokens,
  finish_reason); a dropped stream's text starts the solo text;
- the server goes idle: running, waiting and KV usage back to 0;
- the pool did run out (preemptions > 0);
- the gap between consecutive token chunks of the streams running while a long prompt is prefilled
  (from its send to its first token) stays under ``max_gap_s``;
- last, SIGTERM with streams in flight: they finish (equal to their solo runs), /health says 503,
  and the server exits with code 0.
Sizes come from ``TREESPEC_FAULTS_*`` env vars (``FaultConfig``); the report (counts, durations,
gaps, failed checks with examples) is printed and written as JSON (``FaultConfig.report_path``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from faults.load import (
    FaultConfig,
    Job,
    Result,
    Spec,
    gaps,
    load_prompts,
    make_jobs,
    make_specs,
    mismatch,
    problems,
    quantile,
    run_job,
    run_load,
)
from integration.conftest import MODEL_ID, scrape_metric, start_server, stop_process, wait_until_idle

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(7200)]
CFG = FaultConfig.from_env()


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


@pytest.fixture(scope="module")
def report():
    """The run's report: filled in by the tests, printed and written at the end of the module."""
    import torch

    data = {
        "suite": "tests/faults (make test-faults)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([*(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TREESPEC_FAULTS_")),
                             "python", "-m", "pytest", *sys.argv[1:]]),
        "machine": {"node": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_start": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__},
        "config": dataclasses.asdict(CFG),
        "durations_s": {},
    }
    yield data
    path = CFG.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\n[faults] report {path}:\n{json.dumps({k: v for k, v in data.items() if k != 'examples'}, indent=2)}")


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory, report):
    """(process, url): the server under test, with the tiny KV pool."""
    args = ["--model", str(default_model_dir), "--max-num-seqs", str(CFG.max_num_seqs),
            "--num-kv-blocks", str(CFG.kv_blocks), "--num-threads", "2", *shlex.split(CFG.server_args)]
    report["server_args"] = args
    log_path = tmp_path_factory.mktemp("faults") / "server.log"
    t0 = time.monotonic()
    proc, url = start_server(args, log_path)
    report["durations_s"]["startup"] = rounded(time.monotonic() - t0, 1)
    try:
        yield proc, url
    finally:
        stop_process(proc)
        print(f"\n[faults] server log: {log_path}")


@pytest.fixture(scope="module")
def specs(default_model_dir) -> tuple[list[Spec], list[Spec]]:
    from transformers import AutoTokenizer

    try:
        prompts = load_prompts()
    except FileNotFoundError:
        pytest.skip("../shared/data/train_prompts.jsonl not present")
    return make_specs(CFG, prompts, AutoTokenizer.from_pretrained(str(default_model_dir)))


async def solo_runs(url: str, specs: list[Spec]) -> dict[Spec, Result]:
    """Each spec alone, one after the other, not streamed."""
    async with httpx.AsyncClient(base_url=url, timeout=900.0) as client:
        return {spec: await run_job(client, MODEL_ID, Job(-1, spec, stream=False)) for spec in specs}


@dataclasses.dataclass
class LoadRun:
    results: list[Result]
    solo: dict[Spec, Result]
    not_idle: str | None          # why the server did not go idle after the load (None: it did)
    preemptions: int

    def mismatches(self, seeded: bool) -> list[str]:
        return [f"job {r.job.index} ({r.job.spec.kind}, stream={r.job.stream}): {m}" for r in self.results
                if bool(r.job.spec.temperature) == seeded and (m := mismatch(r, self.solo[r.job.spec]))]

    def gaps(self) -> tuple[list[float], list[float]]:
        """(every inter-chunk gap of the short streams, those while a long prompt was prefilled:
        from its send to its first token)."""
        windows = [(r.start, r.first_token or r.end) for r in self.results if r.job.spec.long]
        return gaps([r for r in self.results if not r.job.spec.long], windows)


def note(report: dict, check: str, found: list[str]) -> list[str]:
    report.setdefault("checks_failed", {})[check] = len(found)
    if found:
        report.setdefault("examples", {})[check] = found[:10]
    return found


@pytest.fixture(scope="module")
def load(server, specs, report) -> LoadRun:
    """The load phase, then the idle check and the solo replay of every spec it used."""
    _, url = server
    jobs = make_jobs(CFG, *specs)
    preempted0 = scrape_metric(url, "treespec_num_preemptions_total")
    recomputed0 = scrape_metric(url, "treespec_recomputed_prompt_tokens_total")
    t0 = time.monotonic()
    results = asyncio.run(run_load(url, MODEL_ID, jobs, CFG.concurrency))
    t1 = time.monotonic()
    try:
        wait_until_idle(url, timeout=30.0)
        not_idle = None
    except AssertionError as exc:
        not_idle = str(exc)
    t2 = time.monotonic()
    preemptions = int(scrape_metric(url, "treespec_num_preemptions_total") - preempted0)
    recomputed = int(scrape_metric(url, "treespec_recomputed_prompt_tokens_total") - recomputed0)
    solo = asyncio.run(solo_runs(url, list(dict.fromkeys(j.spec for j in jobs))))
    run = LoadRun(results, solo, not_idle, preemptions)

    done = [r for r in results if r.status == 200 and not r.dropped]
    every, inside = run.gaps()
    report["counts"] = {
        "requests": len(results), "completed": len(done), "dropped_streams": sum(r.dropped for r in results),
        "streams": sum(r.job.stream for r in results), "long_prompts": sum(r.job.spec.long for r in results),
        "by_kind": dict(Counter(r.job.spec.kind for r in results)),
        "statuses": dict(Counter(str(r.status) for r in results)),
        "finish_reasons": dict(Counter(r.finish_reason for r in done)), "distinct_specs_replayed": len(solo),
        "preemptions": preemptions, "recomputed_prompt_tokens": recomputed,
    }
    report["durations_s"] |= {"load": rounded(t1 - t0, 1), "idle_after_load": rounded(t2 - t1, 2),
                              "solo_replay": rounded(time.monotonic() - t2, 1),
                              "request_p50": rounded(quantile([r.end - r.start for r in results], 0.5), 2),
                              "request_max": rounded(max(r.end - r.start for r in results), 2)}
    report["long_prompts"] = [{"prompt_tokens": r.prompt_tokens, "status": r.status,
                               "time_to_first_token_s": rounded((r.first_token or r.end) - r.start, 2)}
                              for r in results if r.job.spec.long]
    report["inter_chunk_gap_s"] = {
        "max_while_long_prefill": rounded(max(inside, default=None)), "limit": CFG.max_gap_s,
        "p50_while_long_prefill": rounded(quantile(inside, 0.5)),
        "p99_while_long_prefill": rounded(quantile(inside, 0.99)), "gaps_while_long_prefill": len(inside),
        "max_any": rounded(max(every, default=None)), "p50_any": rounded(quantile(every, 0.5)),
        "p99_any": rounded(quantile(every, 0.99)), "gaps_any": len(every),
    }
    return run


def test_no_response_lost_duplicated_or_failed(load, report):
    found = [f"solo run of {spec}: {p}" for spec, res in load.solo.items() for p in problems(res)]
    found += [f"job {r.job.index} ({r.job.spec.kind}, stream={r.job.stream}): {p}"
              for r in load.results for p in problems(r)]
    assert not note(report, "lost_duplicated_or_failed", found), "\n".join(found[:20])
    assert all(r.status == 200 for r in load.results)     # no 5xx, nor any other error status


def test_greedy_outputs_equal_solo_runs(load, report):
    found = load.mismatches(seeded=False)
    assert not note(report, "greedy_differs_from_solo", found), f"{len(found)} differ:\n" + "\n".join(found[:20])


def test_seeded_sampled_outputs_equal_solo_runs(load, report):
    found = load.mismatches(seeded=True)
    assert not note(report, "seeded_differs_from_solo", found), f"{len(found)} differ:\n" + "\n".join(found[:20])


def test_server_idle_after_load(load, report):
    assert not note(report, "not_idle_after_load", [load.not_idle] if load.not_idle else []), load.not_idle


def test_kv_pool_ran_out_and_requests_were_preempted(load, report):
    if not CFG.long:
        pytest.skip("no long prompts (TREESPEC_FAULTS_LONG=0)")
    assert not note(report, "no_preemption", [] if load.preemptions else ["no preemption"]), \
        "the KV pool never ran out: no preemption was exercised (lower TREESPEC_FAULTS_KV_BLOCKS)"


def test_inter_chunk_gap_bounded_while_long_prompts_prefill(load, report):
    if not CFG.long:
        pytest.skip("no long prompts (TREESPEC_FAULTS_LONG=0)")
    _, inside = load.gaps()
    max_gap = max(inside, default=0.0)
    print(f"\n[faults] max inter-chunk gap while a long prompt prefilled: {max_gap:.3f}s "
          f"(limit {CFG.max_gap_s}s, {len(inside)} gaps)")
    found = [f"max inter-chunk gap {max_gap:.2f}s > {CFG.max_gap_s}s"] if max_gap > CFG.max_gap_s else []
    if not inside:
        found.append("no stream emitted two chunks while a long prompt prefilled: nothing measured")
    assert not note(report, "gap_over_limit", found), found


def test_sigterm_drain_lets_streams_finish_and_exits_0(server, specs, report):
    """Last: the server is gone afterwards."""
    proc, url = server
    greedy = [s for s in specs[0] if not s.temperature] or specs[0]
    drain = [dataclasses.replace(greedy[i % len(greedy)], max_tokens=64) for i in range(CFG.drain_streams)]
    solo = asyncio.run(solo_runs(url, list(dict.fromkeys(drain))))

    async def run() -> tuple[list[Result], int | None, float]:
        started: set[int] = set()
        all_started = asyncio.Event()

        def on_token(res: Result) -> None:
            started.add(res.job.index)
            if len(started) == len(drain):
                all_started.set()

        async with httpx.AsyncClient(base_url=url, timeout=300.0) as client:
            tasks = [asyncio.create_task(run_job(client, MODEL_ID, Job(i, spec, stream=True), on_token))
                     for i, spec in enumerate(drain)]
            await asyncio.wait_for(all_started.wait(), timeout=300.0)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                health = (await client.get("/health", timeout=5.0)).status_code
            except httpx.HTTPError:
                health = None                           # already gone
            return list(await asyncio.gather(*tasks)), health, signalled

    results, health, signalled = asyncio.run(run())
    streams_done = max(r.end for r in results) - signalled
    try:
        code = proc.wait(timeout=CFG.drain_exit_s)
    except subprocess.TimeoutExpired:
        code = None
    exited = time.monotonic() - signalled
    found = [f"drain stream {r.job.index}: {p}" for r in results for p in problems(r)]
    found += [f"drain stream {r.job.index}: {m}" for r in results if (m := mismatch(r, solo[r.job.spec]))]
    if health not in (503, None):
        found.append(f"/health answered {health} while draining")
    if code != 0:
        found.append(f"server exit code {code} (None: still running {CFG.drain_exit_s}s after SIGTERM)")
    report["drain"] = {"streams": len(results), "finished": sum(r.finishes == 1 for r in results),
                       "finish_reasons": dict(Counter(r.finish_reason for r in results)),
                       "health_while_draining": health, "exit_code": code,
                       "streams_done_after_sigterm_s": rounded(streams_done, 2),
                       "exit_after_sigterm_s": rounded(exited, 2), "limit_s": CFG.drain_exit_s}
    assert not note(report, "drain", found), "\n".join(found[:20])
