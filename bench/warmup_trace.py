"""The first steps of one request in the default server, one line per engine step: the budget it served, the
runner's draft / forward / accept ms, and each clean step that budget feedback observed (budget, committed
tokens, seconds). Shows why feedback switches a batch size's budget early::

    .venv/bin/python -m bench.warmup_trace --steps 40 > bench/results/issue8/warmup_trace_intel.txt
"""

from __future__ import annotations

import argparse

from bench.harness import build_prompts
from bench.questions import load_questions
from server.build import build_engine
from server.config import ServerConfig
from server.engine.request import SamplingParams


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default="../shared/data/mt_bench.jsonl")
    p.add_argument("--question", type=int, default=0, help="index of the question (0: the benchmark's warm-up)")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    engine, _ = build_engine(ServerConfig())
    policy, runner = engine.scheduler.policy, engine.runner
    observe, execute, served = policy.observe, runner.execute, []

    def observed(batch, budget, tokens, seconds):
        print(f"   observed: budget {budget}, {tokens} tokens in {seconds * 1e3:.1f} ms")
        observe(batch, budget, tokens, seconds)

    def executed(sched):
        out = execute(sched)
        served.append((sched.budget, out.timings))
        return out

    policy.observe, runner.execute = observed, executed
    question = load_questions(args.questions)[args.question]
    (_, _, ids), = build_prompts(engine, [question])
    engine.add_request("q", ids, SamplingParams(max_tokens=args.steps * 8, temperature=0.0))
    print(f"question {question.question_id} ({question.category}); batch-1 leader at start: {policy.budget(1)}")
    for step in range(args.steps):
        engine.step()
        budget, timings = served[-1]
        print(f"step {step}: served budget {budget}, " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in timings.items())
              + f"; batch-1 leader now {policy.budget(1)}")


if __name__ == "__main__":
    main()
