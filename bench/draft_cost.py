"""Drafting cost per phase and per depth against a plain decode step (real model, shipped or given drafters, CPU).

Usage: .venv/bin/python -m bench.draft_cost --out bench/results/draft_cost.json

Each request is an MT-bench first turn plus the target's own greedy continuation, so the
drafters see real features and the target's real next tokens. A step proposes trees for the
batch, accepts each tree's longest path that matches the continuation (what greedy
verification would accept), and commits it plus the bonus token, as the runner does. The
drafter phases are timed by wrapping ``EagleTreeDrafter.context_pass`` / ``trees`` (rerank,
with its one host transfer), ``Expansion.forward`` / ``head`` / ``top``, ``PoolBuilder.settled``
(the early-stop check) and ``GumihoTreeDrafter.parallel`` (MLP stage); the rest of ``propose`` is
"other". ``--methods hybrid`` times the served default: the EAGLE drafter with prompt lookup and the
shipped corpus grafted on (``HybridDrafter._merge``: lookup, corpus search, graft and rerank, phase
"graft"). Configurations are run round-robin, with one plain decode step (target forward of
one token plus its LM head, at the same context) timed in every round, so all figures share
the host's conditions. A PNG bar chart is written beside the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.harness import machine_info
from bench.questions import load_questions
from drafters.base import AcceptUpdate, DraftRequest
from drafters.eagle import EagleTreeDrafter
from drafters.eagle_model import load_checkpoint
from drafters.expansion import Expansion, PoolBuilder
from drafters.gumiho import GumihoTreeDrafter
from drafters.gumiho_model import load_gumiho_checkpoint
from drafters.hybrid import HybridConfig, HybridDrafter
from drafters.registry import corpus_index, shipped_drafter
from drafters.tree import DraftTree
from kernels import ReferenceBackend, SeqAttention
from server.build import load_model, resolve_model_path
from server.engine.request import SamplingParams
from server.models.loader import load_tokenizer

BLOCK = 16
PHASES = ["context", "forward", "head", "topk", "mlp", "stop_check", "rerank", "graft", "other"]


class Recorder:
    """Collects ``(phase, seconds)`` of the calls made while ``active``."""

    def __init__(self):
        self.calls: list[tuple[str, float]] | None = None

    def wrap(self, owner: type, method: str, phase: str) -> None:
        inner = getattr(owner, method)
        recorder = self

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            if recorder.calls is not None:
                recorder.calls.append((phase, time.perf_counter() - t))
            return out

        setattr(owner, method, timed)


class Target:
    """The target model over a private paged KV cache: greedy continuation, features, plain-step timing."""

    def __init__(self, model, max_len: int):
        self.model = model
        c = model.config
        blocks = -(-max_len // BLOCK)
        shape = (blocks, BLOCK, c.num_key_value_heads, c.head_dim)
        self.kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.num_hidden_layers)]
        self.table = list(range(blocks))
        self.backend = ReferenceBackend(BLOCK)

    def forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Hidden ``[n, H]`` of ``ids`` at positions ``start ..`` (earlier positions already in the cache)."""
        meta = self.backend.build_metadata([SeqAttention(self.table, start, len(ids))])
        return self.model(torch.tensor(ids), torch.arange(start, start + len(ids)), self.kv, meta, self.backend)

    def continue_greedy(self, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Prompt + greedy continuation, and the target features of every position ``[n, H]``."""
        ids = list(prompt)
        hidden = self.forward(ids, 0)
        for _ in range(new_tokens):
            ids.append(int(self.model.compute_logits(hidden[-1:]).argmax()))
            hidden = self.forward(ids[-1:], len(ids) - 1)
        return ids, self.forward(ids, 0).clone()

    def plain_step(self, ids: list[int], pos: int) -> float:
        """Seconds of one decode step: forward of token ``pos`` over ``pos`` cached positions plus its LM head.
        (The cache holds the last continuation's keys there; the cost does not depend on their values.)"""
        t = time.perf_counter()
        self.model.compute_logits(self.forward(ids[pos:pos + 1], pos))
        return time.perf_counter() - t


def accepted(tree: DraftTree, truth: list[int]) -> int:
    """Length of the tree's longest root path that matches ``truth`` (greedy verification)."""
    node, depth = -1, 0
    while depth < len(truth):
        node = next((i for i in tree.children(node) if tree.tokens[i] == truth[depth]), None)
        if node is None:
            break
        depth += 1
    return depth


class Run:
    """One configuration: a drafter drafting for ``batch`` sequences, step by step."""

    def __init__(self, method: str, budget: int, drafter, seqs: list[tuple[list[int], torch.Tensor]],
                 starts: list[int], weights: str = "float32", checkpoint: str = "", threads: int | None = None):
        self.method, self.budget, self.drafter, self.seqs, self.starts = method, budget, drafter, seqs, starts
        self.threads = threads                              # torch threads while drafting (None: the target's)
        self.weights = weights                              # dtype of the drafter's weight matrices
        self.checkpoint = checkpoint                        # the drafter's checkpoint folder
        self.steps: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.pos = list(self.starts)                        # committed tokens; the last one is the root
        self.drafter.on_accept([AcceptUpdate(f"r{b}", 0, ids[:p - 1], feats[:p - 1], ids[p - 1], reset=True)
                                for b, ((ids, feats), p) in enumerate(zip(self.seqs, self.pos))])
        self.drafter.propose(self.asks())                  # untimed: the prompt's context pass

    def asks(self) -> list[DraftRequest]:
        return [DraftRequest(f"r{b}", ids[:p], SamplingParams(), self.budget)
                for b, ((ids, _), p) in enumerate(zip(self.seqs, self.pos))]

    def step(self, recorder: Recorder, target: Target, timed: bool) -> None:
        if any(p + 8 >= len(ids) for (ids, _), p in zip(self.seqs, self.pos)):
            self.reset()
        plain = target.plain_step(self.seqs[0][0], self.pos[0] - 1)
        asks = self.asks()
        recorder.calls = []
        target_threads = torch.get_num_threads()
        t = time.perf_counter()
        if self.threads:
            torch.set_num_threads(self.threads)
        trees = self.drafter.propose(asks)
        if self.threads:
            torch.set_num_threads(target_threads)
        total = time.perf_counter() - t
        calls, recorder.calls = recorder.calls, None
        updates = []
        for b, ((ids, feats), p, tree) in enumerate(zip(self.seqs, self.pos, trees)):
            n = accepted(tree, ids[p:]) + 1                # accepted drafts + the bonus token
            updates.append(AcceptUpdate(f"r{b}", p - 1, ids[p - 1:p - 1 + n], feats[p - 1:p - 1 + n], ids[p - 1 + n]))
            self.pos[b] = p + n
        self.drafter.on_accept(updates)
        if timed:
            self.steps.append({"total": total, "plain": plain, "calls": calls, "committed": updates,
                               "context": sum(self.pos) / len(self.pos)})

    def summary(self) -> dict:
        """Medians over timed steps (ms); per depth over the steps that reached it."""
        phases = defaultdict(list)
        depths: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        reached = []
        for s in self.steps:
            sums = dict.fromkeys(PHASES, 0.0)
            counts = defaultdict(int)
            for phase, sec in s["calls"]:
                sums[phase] += sec
                if phase in ("forward", "head", "topk"):
                    # head/topk call i scores depth i + 1 (call 0: the roots); forward i produces depth i + 2
                    depth = counts[phase] + (2 if phase == "forward" else 1)
                    counts[phase] += 1
                    depths[depth][phase].append(sec * 1e3)
            reached.append(1 + counts["forward"])
            sums["other"] = s["total"] - sum(sums.values())
            for phase, sec in sums.items():
                phases[phase].append(sec * 1e3)
        total = float(np.median([s["total"] for s in self.steps]) * 1e3)
        plain = float(np.median([s["plain"] for s in self.steps]) * 1e3)
        tau = float(np.mean([len(u.fed_tokens) for s in self.steps for u in s["committed"]]))
        return {
            "method": self.method, "checkpoint": self.checkpoint, "weights": self.weights, "budget": self.budget,
            "batch": len(self.seqs), "draft_threads": self.threads or torch.get_num_threads(),
            "steps": len(self.steps),
            "draft_ms": total, "plain_step_ms": plain, "draft_over_plain": total / plain,
            "tau_greedy": tau, "mean_context": float(np.mean([s["context"] for s in self.steps])),
            "phases_ms": {p: float(np.median(v)) for p, v in phases.items()},
            "depths_reached": {str(d): reached.count(d) for d in sorted(set(reached))},
            "per_depth_ms": {str(d): {p: float(np.median(v)) for p, v in sorted(ph.items())} | {
                "steps": len(next(iter(ph.values())))} for d, ph in sorted(depths.items())},
        }


def drafter_nets(target_model, methods: list[str], weights: list[str], paths: dict[str, list[str]]) -> dict:
    """(method, weights, folder) -> the drafter network of each checkpoint folder in ``paths[method]`` (with its
    truncated head) on the target's embedding and head, its weight matrices in ``weights``
    (``EagleDrafter.cast_matrices``)."""
    loaders = {"eagle": load_checkpoint, "hybrid": load_checkpoint, "gumiho": load_gumiho_checkpoint}
    return {(m, w, folder): loaders[m](folder, target_model.embed_tokens,
                                       target_model.lm_head).cast_matrices(getattr(torch, w))
            for m in methods for w in weights for folder in paths[m]}


def make_drafter(net, method: str, budget: int, top_k: int, pruning: int, corpus=None):
    """The shipped configuration (default depth: eagle 5, gumiho 6; Gumiho ``mlp_top_k = pruning``; the hybrid
    with the default options and ``corpus``)."""
    if method == "eagle":
        return EagleTreeDrafter(net, budget, None, top_k)
    if method == "hybrid":
        return HybridDrafter(EagleTreeDrafter(net, budget, None, top_k), HybridConfig(), budget, corpus)
    return GumihoTreeDrafter(net, budget, None, top_k, pruning, pruning)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']} {r['weights']}\n{Path(r['checkpoint']).name}\nbudget {r['budget']}\nbatch {r['batch']}"
              f"\nthreads {r['draft_threads']}" for r in results]
    fig, ax = plt.subplots(figsize=(1.4 * len(results) + 3, 5))
    bottom = np.zeros(len(results))
    for phase in PHASES:
        values = np.array([max(r["phases_ms"].get(phase, 0.0), 0.0) for r in results])
        ax.bar(labels, values, bottom=bottom, label=phase)
        bottom += values
    limit = [0.15 * r["plain_step_ms"] for r in results]
    ax.scatter(labels, limit, marker="_", s=900, color="black", zorder=3, label="15% of a plain step")
    ax.set_ylabel("ms per drafting step (median)")
    ax.set_title("Drafting cost by phase (SmolLM2-135M drafters, CPU)")
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/draft_cost.json")
    p.add_argument("--methods", nargs="+", default=["eagle", "gumiho"], choices=["eagle", "gumiho", "hybrid"])
    p.add_argument("--budgets", nargs="+", type=int, default=[8, 16])
    p.add_argument("--weights", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="dtypes of the drafters' weight matrices to compare (activations stay fp32)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--top-k", type=int, default=4, help="frontier width (the shipped config: 4)")
    p.add_argument("--pruning", type=int, default=8, help="Gumiho MLP-stage width (the shipped config: 8)")
    p.add_argument("--steps", type=int, default=60, help="timed drafting steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per configuration first")
    p.add_argument("--new-tokens", type=int, default=224, help="greedy continuation per prompt")
    p.add_argument("--start", type=int, default=32, help="continuation tokens committed before drafting starts")
    p.add_argument("--questions", default="../shared/data/mt_bench.jsonl")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--draft-threads", nargs="+", type=int, default=[0],
                   help="torch threads while drafting, compared round-robin (0: --num-threads; the timing includes "
                        "switching the thread count)")
    p.add_argument("--eagle-path", nargs="+", default=None,
                   help="EAGLE (and hybrid) checkpoint folder(s), timed round-robin (default: the shipped one)")
    p.add_argument("--gumiho-path", nargs="+", default=None,
                   help="Gumiho checkpoint folder(s), timed round-robin (default: the shipped one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads or os.cpu_count())
    load_before = os.getloadavg()
    path = resolve_model_path("default")
    model = load_model(path)
    tok = load_tokenizer(path)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q.turns[0]}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in load_questions(args.questions, limit=max(args.batches))]
    target = Target(model, max(len(x) for x in prompts) + args.new_tokens + 1)
    with torch.inference_mode():
        seqs = [target.continue_greedy(x, args.new_tokens) for x in prompts]
    paths = {m: given or [str(shipped_drafter("default", m))]
             for m, given in (("eagle", args.eagle_path), ("gumiho", args.gumiho_path))}
    paths["hybrid"] = paths["eagle"]
    nets = drafter_nets(model, args.methods, args.weights, paths)
    corpus = corpus_index(SimpleNamespace(hybrid=HybridConfig(), model="default")) if "hybrid" in args.methods else None
    starts = [len(x) + args.start for x in prompts]
    runs = [Run(method, budget, make_drafter(nets[method, w, folder], method, budget, args.top_k, args.pruning, corpus),
                seqs[:batch], starts[:batch], w, folder, threads or None)
            for method in args.methods for folder in paths[method] for budget in args.budgets
            for batch in args.batches for w in args.weights for threads in args.draft_threads]
    recorder = Recorder()
    for owner, method, phase in ((EagleTreeDrafter, "context_pass", "context"), (EagleTreeDrafter, "trees", "rerank"),
                                 (Expansion, "forward", "forward"), (Expansion, "head", "head"),
                                 (Expansion, "top", "topk"), (PoolBuilder, "settled", "stop_check"),
                                 (GumihoTreeDrafter, "parallel", "mlp"), (HybridDrafter, "_merge", "graft")):
        recorder.wrap(owner, method, phase)
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            for run in runs:
                run.step(recorder, target, timed=i >= args.warmup)
    results = [run.summary() for run in runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": shlex.join([".venv/bin/python", "-m", "bench.draft_cost", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "nproc": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    for r in results:
        print(f"{r['method']:6s} {Path(r['checkpoint']).name} {r['weights']:8s} budget {r['budget']:2d} batch {r['batch']} "
              f"threads {r['draft_threads']}: draft {r['draft_ms']:.2f} ms, plain step "
              f"{r['plain_step_ms']:.2f} ms ({100 * r['draft_over_plain']:.0f}%), depths {r['depths_reached']}, "
              f"phases " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items()))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
