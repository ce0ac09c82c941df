"""Where a served step's time goes: ``torch.profiler`` over engine steps, one table per drafter.

Builds the engine as ``treespec serve`` would (``--calibrate-tree`` off: every step drafts ``--budget`` nodes),
starts ``--concurrency`` requests from the questions' first turns, lets them run ``--warmup`` steps (prefill,
first compiles), then profiles ``--steps`` steps. For each drafter it writes the runner's own split (draft /
forward / accept, synchronised) and the ops with the most self time on the host and on the device, so a GPU
session that finds a phase slow learns why in one call::

    python -m bench.profile_step --device cuda --drafters none lookup eagle --out $OUT/profile.json
    python -m bench.profile_step --device cuda --drafters none --cuda-graphs false --out $OUT/eager.json
    python -m bench.profile_step --device cpu --drafters eagle --steps 4 --out /tmp/profile.json   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench.harness import build_prompts, machine_info
from bench.questions import load_questions
from server.build import build_engine
from server.config import ServerConfig
from server.engine.request import SamplingParams

TOP = 25


def prompts(path: str, n: int, engine) -> list[list[int]]:
    """The first turn of the first ``n`` questions (cycled), chat-templated."""
    questions = load_questions(path)
    return [ids for _, _, ids in build_prompts(engine, [questions[i % len(questions)] for i in range(n)])]


def top_ops(prof, key: str) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:TOP]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3} for e in rows]


def profile_drafter(args, drafter: str) -> dict:
    graphs = {"auto": None, "true": True, "false": False}[args.cuda_graphs]
    cfg = ServerConfig(model=args.model, device=args.device, drafter=drafter, max_draft_tokens=args.budget,
                       calibrate_tree=False, max_num_seqs=max(args.concurrency, 1), cuda_graphs=graphs)
    engine, _ = build_engine(cfg)
    for i, ids in enumerate(prompts(args.questions, args.concurrency, engine)):
        engine.add_request(f"q{i}", ids, SamplingParams(max_tokens=args.warmup + args.steps * 8, temperature=0.0))
    for _ in range(args.warmup):
        engine.step()
    runner, split, steps = engine.runner, {}, 0
    execute = runner.execute

    def timed(sched):
        out = execute(sched)
        for phase, seconds in out.timings.items():
            split[phase] = split.get(phase, 0.0) + seconds
        return out

    runner.execute = timed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        while steps < args.steps and engine.has_unfinished():
            engine.step()
            steps += 1
    runner.execute = execute
    result = {"drafter": drafter, "steps": steps,
              "runner_split_ms": {k: 1e3 * v / max(steps, 1) for k, v in split.items()},
              "top_host_ops": top_ops(prof, "self_cpu_time_total"),
              "top_device_ops": top_ops(prof, "self_device_time_total") if args.device == "cuda" else []}
    print(f"{drafter}: {steps} steps, per step " + ", ".join(f"{k} {v:.2f} ms"
                                                             for k, v in result["runner_split_ms"].items()))
    for row in result["top_host_ops"][:10]:
        print(f"  {row['op'][:50]:50s} {row['calls']:7d} calls  host {row['self_cpu_ms']:9.2f} ms  "
              f"device {row['self_device_ms']:9.2f} ms")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--drafters", nargs="+", default=["none", "lookup", "eagle"])
    p.add_argument("--budget", type=int, default=16, help="draft nodes per request per step")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--questions", default="../shared/data/mt_bench.jsonl")
    p.add_argument("--warmup", type=int, default=8, help="steps before profiling (prefill, first compiles)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cuda-graphs", choices=["auto", "true", "false"], default="auto",
                   help="auto: on with CUDA (the server's default); false profiles the eager forward")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report = {"command": "python -m bench.profile_step " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "budget": args.budget, "concurrency": args.concurrency,
              "results": [profile_drafter(args, d) for d in args.drafters]}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
