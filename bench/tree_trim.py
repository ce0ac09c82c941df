"""Offline study: trim each step's draft tree to the size its own scores say pays, against fixed budgets.

A node's score is its path's summed log-confidence; with calibrated confidences (``bench.confidence``:
near calibrated at every depth) ``exp(score)`` is the chance the target accepts it, so the top-``m``
nodes of a tree are expected to commit ``1 + sum(exp(s_i))`` tokens. Given the host's cost of a
verify forward with ``m`` tree tokens, ``V(m)``, and of drafting at the cap, ``D``, the ``trim``
policy verifies the ``m`` that maximises ``(1 + sum_{i<m} exp(s_i)) / (D + V(m))``, each step.
Replays held-out greedy answers (as ``bench.lookup_replay``: the served ``hybrid`` drafter, its
shipped corpus) once per policy and reports τ and the modelled tokens per second::

    python -m bench.tree_trim --eval bench/results/issue8/mtbench_answers --max-records 40 \\
        --verify-ms 0:39.3 4:39.3 8:41.9 16:54.8 --draft-ms 4:3.3 8:4.5 16:6.2 --out .cache/trim.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from bench.compare import shape_for
from bench.harness import hf_model, machine_info
from bench.lookup_replay import eagle_checkpoint, replay
from drafters.registry import DRAFTERS
from drafters.train.distill import distill_shards
from drafters.train.features import data_folders, shard_records, target_features
from drafters.tree import DraftTree, rerank
from server.config import ServerConfig, merge_options
from server.engine.budget import interp


def trim_size(scores: list[float], sizes: list[int], verify_s: list[float], draft_s: float) -> int:
    """The ``m`` maximising ``(1 + sum of the m best exp(score)) / (draft_s + verify(m))``, ``verify``
    interpolated over ``sizes``; the best ``m`` nodes by score form a tree (scores never grow with depth)."""
    gains = sorted((math.exp(s) for s in scores), reverse=True)
    expected, best = 1.0, 0
    best_rate = expected / (draft_s + interp(0, sizes, verify_s))
    for m, gain in enumerate(gains, start=1):
        expected += gain
        rate = expected / (draft_s + interp(m, sizes, verify_s))
        if rate > best_rate:
            best, best_rate = m, rate
    return best


def pairs(items: list[str]) -> dict[int, float]:
    return {int(k): float(v) / 1000 for k, v in (s.split(":") for s in items)}


def trimmed_replay(drafter, rid: str, ids: list[int], start: int, features: torch.Tensor, cap: int, size
                   ) -> tuple[int, list[int]]:
    """Greedy replay of one record; ``size(tree)`` picks each step's verified node count. Returns (tokens
    committed after the prefill's, verified node count per step)."""
    sizes: list[int] = []

    def trim(tree: DraftTree, answer: list[int]) -> DraftTree:
        sizes.append(size(tree))
        return rerank(tree.tokens, tree.parents, tree.scores, sizes[-1])

    tokens, _ = replay(drafter, rid, ids, start, features, cap, trim)
    return tokens, sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", required=True, help="distillation folders replayed whole, comma-joined")
    parser.add_argument("--caps", type=int, nargs="+", default=[16], help="trees drafted at these budgets")
    parser.add_argument("--fixed", type=int, nargs="+", default=[4, 8, 16], help="fixed budgets compared")
    parser.add_argument("--verify-ms", nargs="+", required=True, help="batch-1 verify ms by tree size, n:ms")
    parser.add_argument("--draft-ms", nargs="+", required=True, help="batch-1 drafting ms by budget, n:ms")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-records", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    verify, draft = pairs(args.verify_ms), pairs(args.draft_ms)
    sizes = sorted(verify)
    row = [verify[n] for n in sizes]
    shards = {str(f): distill_shards(f) for f in data_folders(args.eval)}
    records = [(f, r) for f, paths in shards.items()
               for r in [r for p in paths for r in shard_records(p) if r["temperature"] == 0][:args.max_records or None]]
    cfg = ServerConfig()
    target = hf_model(cfg)
    _, aux = eagle_checkpoint(cfg)
    stub = SimpleNamespace(embed_tokens=target.model.embed_tokens, lm_head=target.lm_head)
    features = {}
    for f, r in tqdm(records, desc="features", unit="rec"):
        ids = r["input_ids"][:r["prompt_len"] + args.max_tokens]
        features[f, r["id"]] = ids, target_features(target, [ids], aux)[0]               # [L, F]
    drafting = {c: interp(c, sorted(draft), [draft[k] for k in sorted(draft)]) for c in {*args.fixed, *args.caps}}
    policies = [(f"fixed@{b}", b, lambda t, b=b: min(b, len(t))) for b in args.fixed]
    policies += [(f"trim@{c}", c, lambda t, c=c: trim_size(t.scores, sizes, row, drafting[c])) for c in args.caps]
    rows = []
    for name, cap, size in policies:
        drafter = DRAFTERS["hybrid"](ServerConfig(**merge_options(cfg.model_dump(), shape_for(cap))), stub)
        d_s = drafting[cap]
        tokens = steps = 0
        seconds = 0.0
        hist: dict[int, int] = {}
        for (f, r) in tqdm(records, desc=name, unit="rec"):
            ids, feats = features[f, r["id"]]
            n, ms = trimmed_replay(drafter, r["id"], ids, r["prompt_len"], feats, cap, size)
            tokens, steps = tokens + n, steps + len(ms)
            seconds += sum(d_s + interp(m, sizes, row) for m in ms)
            for m in ms:
                hist[m] = hist.get(m, 0) + 1
        rows.append({"policy": name, "cap": cap, "records": len(records), "tokens": tokens, "steps": steps,
                     "tau": round(tokens / steps, 4), "mean_nodes": round(sum(k * v for k, v in hist.items()) / steps, 2),
                     "modelled_tok_s": round(tokens / seconds, 2), "nodes_hist": dict(sorted(hist.items()))})
        print(json.dumps(rows[-1]), flush=True)
    plain = 1 / verify[0]
    for r in rows:
        r["modelled_speedup"] = round(r["modelled_tok_s"] / plain, 3)
    report = {"command": "python -m bench.tree_trim " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "replayed": {f: [p.name for p in paths] for f, paths in shards.items()},
              "verify_ms": args.verify_ms,
              "draft_ms": args.draft_ms, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
