"""Simulated served steps for ``ServedBudgets`` (server/engine/budget_feedback.py): how often it serves the
faster arm, and what its probing costs, when tree steps are as noisy as served ones.

A step at budget ``n`` takes ``cost[n]`` seconds (times the host's factor and, with noise, a 5% log-normal
jitter); a plain step commits one token per request, a tree step 1-5 per request drawn from the accepted
lengths of served MT-bench steps (``ACCEPTED``/``WEIGHTS``; noise-free: ``tau[n]`` each). ``sweep`` runs a
grid of true tree speeds (tree rate over plain rate) from both priors (calibration chose plain decoding,
or a tree) and reports the throughput the policy delivered relative to plain decoding and to the better arm.
``requests`` serves a stream of requests one at a time (batch 1) where a share are hard (their tree steps
accept ``HARD``, slower than plain decoding) and compares the policy told each step's request with one
not told (evidence carried from request to request), always-tree, always-plain and a per-request oracle.

    python -m bench.budget_feedback_sim --out bench/results/issue8/budget_feedback_sim.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from server.engine.budget import BudgetPolicy
from server.engine.budget_feedback import ServedBudgets

ACCEPTED, WEIGHTS = (1, 2, 3, 4, 5), (0.36, 0.32, 0.17, 0.08, 0.07)   # tokens per request per tree step
MEAN_ACCEPTED = sum(a * w for a, w in zip(ACCEPTED, WEIGHTS))           # 2.18
TREE = 4                                                               # the tree arm's budget
HARD = (0.87, 0.11, 0.02, 0.0, 0.0)                                    # a hard request's histogram: 1.15


def serve(policy: ServedBudgets, steps: int, cost: dict[int, float], tau: dict[int, float],
          host: Callable[[int], float] = lambda step: 1.0, clean: Callable[[int], bool] = lambda step: True,
          batch: int = 8, catch_up: float = 0.0, rng: random.Random | None = None) -> list[int]:
    """``steps`` steps at ``batch`` decoding requests: budget ``n`` commits ``batch * tau[n]`` tokens in
    ``cost[n] * host(step)`` seconds, a tree step ``catch_up`` seconds more per plain step since the previous
    tree step (the drafter absorbing what it missed); only clean steps are reported. With ``rng`` tree
    steps commit random accepted lengths and every step's time jitters. Returns the budget each step served."""
    served, missed = [], 0
    for step in range(steps):
        n = policy.serve(batch)
        served.append(n)
        seconds = cost[n] * host(step) + (catch_up * missed if n else 0.0)
        missed = 0 if n else missed + 1
        tokens = round(batch * tau[n]) if rng is None or not n else sum(rng.choices(ACCEPTED, WEIGHTS, k=batch))
        if clean(step):
            policy.observe(batch, n, tokens, seconds * (1.0 if rng is None else math.exp(rng.gauss(0, 0.05))))
    return served


def delivered(speed: float, prior: int, steps: int, seeds: int, batch: int = 8) -> dict:
    """Mean over ``seeds`` runs of a tree ``speed`` times plain decoding's rate, calibration's choice ``prior``
    (``TREE`` or 0): the tree's share of steps, the rate relative to plain decoding and to the better arm."""
    share = lead = 0.0
    for seed in range(seeds):
        policy = ServedBudgets(BudgetPolicy.fixed(prior, batch), (0 if prior else TREE,) * batch)
        cost = {0: 0.030, TREE: 0.030 * MEAN_ACCEPTED / speed}
        served = serve(policy, steps, cost, {0: 1.0, TREE: MEAN_ACCEPTED}, batch=batch, rng=random.Random(seed))
        share += served.count(TREE) / steps / seeds
        lead += (policy.budget(batch) == TREE) / seeds
    tokens, seconds = share * MEAN_ACCEPTED + 1 - share, share * MEAN_ACCEPTED / speed + 1 - share   # per plain step
    rate = tokens / seconds
    return {"tree_speed": speed, "prior": prior, "tree_share": round(share, 4), "tree_leads_at_end": round(lead, 4),
            "vs_plain": round(rate, 4), "vs_best": round(rate / max(1.0, speed), 4)}


def serve_requests(policy: ServedBudgets, hard: list[bool], cost: dict[int, float], rng: random.Random,
                   tell: bool = True, max_tokens: int = 128) -> tuple[int, float]:
    """Requests served one after another at batch 1, each until ``max_tokens``; request ``i``'s tree steps
    accept from ``HARD`` if ``hard[i]`` else from ``WEIGHTS``. With ``tell`` each step reports its request.
    Returns (tokens, seconds) over all requests."""
    tokens, seconds = 0, 0.0
    for i, is_hard in enumerate(hard):
        done = 0
        while done < max_tokens:
            n = policy.serve(1)
            k = rng.choices(ACCEPTED, HARD if is_hard else WEIGHTS)[0] if n else 1
            t = cost[n] * math.exp(rng.gauss(0, 0.05))
            policy.observe(1, n, k, t, frozenset({str(i)}) if tell else frozenset())
            done, tokens, seconds = done + k, tokens + k, seconds + t
    return tokens, seconds


def request_stream(seeds: int, requests: int, hard_share: float, tree_cost: float) -> dict:
    """Throughput relative to always-plain of each way to serve ``requests`` requests at batch 1 (a
    ``hard_share`` of them hard), a tree step costing ``tree_cost`` plain steps; mean over ``seeds``."""
    cost = {0: 0.030, TREE: 0.030 * tree_cost}
    mean_hard = sum(a * w for a, w in zip(ACCEPTED, HARD))
    rows: dict[str, float] = {}
    for seed in range(seeds):
        hard = [random.Random(seed).random() < hard_share for _ in range(requests)]
        hard = [random.Random(f"{seed}-{i}").random() < hard_share for i in range(requests)]
        for name, prior, probe, tell in (("told_requests", TREE, 0, True), ("not_told", TREE, 0, False),
                                         ("always_tree", TREE, None, False)):
            tok, sec = serve_requests(ServedBudgets(BudgetPolicy.fixed(prior), (probe,)), hard, cost,
                                      random.Random(seed), tell)
            rows[name] = rows.get(name, 0.0) + tok / sec * 0.030 / seeds
        oracle = sum(1 / max(1.0, (mean_hard if h else MEAN_ACCEPTED) / tree_cost) for h in hard)
        rows["oracle"] = rows.get("oracle", 0.0) + len(hard) / oracle / seeds
    return {"hard_share": hard_share, "tree_cost": tree_cost, "hard_tree_speed": round(mean_hard / tree_cost, 3),
            "easy_tree_speed": round(MEAN_ACCEPTED / tree_cost, 3), **{k: round(v, 4) for k, v in rows.items()}}


def sweep(speeds: list[float], steps: int, seeds: int) -> list[dict]:
    return [delivered(s, prior, steps, seeds) for prior in (0, TREE) for s in speeds]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for prior, label in ((0, "calibration chose plain"), (TREE, f"calibration chose budget {TREE}")):
        part = [r for r in rows if r["prior"] == prior]
        x = [r["tree_speed"] for r in part]
        ax1.plot(x, [r["vs_plain"] for r in part], "o-", label=label)
        ax2.plot(x, [r["tree_share"] for r in part], "o-", label=label)
    x = sorted({r["tree_speed"] for r in rows})
    ax1.plot(x, [max(1.0, s) for s in x], "k--", lw=1, label="the better arm")
    ax1.set(xlabel="tree rate / plain rate (true)", ylabel="delivered rate / plain rate",
            title="Throughput the policy delivers")
    ax2.set(xlabel="tree rate / plain rate (true)", ylabel="share of steps drafting a tree",
            title="Steps served with a tree")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speeds", type=float, nargs="+", default=[0.8, 0.85, 0.92, 0.97, 1.0, 1.03, 1.08, 1.15, 1.3])
    p.add_argument("--steps", type=int, default=1500, help="steps per run at batch 8")
    p.add_argument("--seeds", type=int, default=40, help="runs per grid point")
    p.add_argument("--requests", type=int, default=40, help="requests per request-stream run (batch 1)")
    p.add_argument("--hard-shares", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    p.add_argument("--tree-cost", type=float, default=1.4, help="a tree step's cost in plain steps (streams)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = sweep(args.speeds, args.steps, args.seeds)
    streams = [request_stream(args.seeds, args.requests, h, args.tree_cost) for h in args.hard_shares]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": f"python -m bench.budget_feedback_sim --steps {args.steps} --seeds {args.seeds} "
                         f"--requests {args.requests} --hard-shares {' '.join(map(str, args.hard_shares))} "
                         f"--tree-cost {args.tree_cost} --out {out}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "note": "simulated steps (no model): batch 8, plain step 30 ms, tree steps commit 1-5 tokens per "
                      "request (served MT-bench histogram), 5% jitter; ServedBudgets defaults", "rows": rows,
              "request_streams_note": "batch 1, requests of 128 tokens one after another, tree steps of "
                                      "hard requests accept 1.15 tokens; throughput relative to always-plain",
              "request_streams": streams}
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    for r in rows + streams:
        print(r)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
