"""How well the EAGLE drafter's confidence predicts acceptance: a reliability table per tree depth.

Replays held-out greedy answers the target wrote (as ``bench.lookup_replay``, the EAGLE drafter alone,
no lookup) and, for every draft node whose parent the target accepted (or a root child), records its
depth, the drafter's probability of it given its parent (``exp`` of the score step) and whether the
target's token there equals it. EAGLE-2 ranks nodes by the product of these probabilities; if the
acceptance rate at a given probability differs by depth, the product misranks deep against shallow nodes.
Writes JSON (command, machine, date, per-depth bins: count, mean probability, acceptance rate) and a PNG::

    python -m bench.confidence --data drafters/data/smollm2-distill-self6 --heldout-shards 2 \\
        --max-records 128 --out bench/results/issue8/confidence_self6.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.compare import shape_for
from bench.harness import hf_model, machine_info
from bench.lookup_replay import eagle_checkpoint, model_drafter, replay, replay_sets
from drafters.train.features import target_features
from drafters.tree import DraftTree
from server.config import ServerConfig, merge_options

EDGES = np.linspace(0.0, 1.0, 11)                                 # probability bins


def judged_nodes(tree: DraftTree, answer: list[int]) -> list[tuple[int, float, bool]]:
    """(depth, probability given the parent, accepted) of every node whose parent the target accepted."""
    depths, out, ok = tree.depths, [], [False] * len(tree)
    for j, (tok, par, score) in enumerate(zip(tree.tokens, tree.parents, tree.scores)):
        if par >= 0 and not ok[par]:
            continue
        d = int(depths[j])
        if d > len(answer):
            continue
        ok[j] = tok == answer[d - 1]
        out.append((d, float(np.exp(score - (tree.scores[par] if par >= 0 else 0.0))), ok[j]))
    return out


def collect(drafter, rid: str, ids: list[int], start: int, features: torch.Tensor, budget: int) -> list:
    """Replay one record greedily (the EAGLE drafter alone) and judge every step's tree."""
    rows: list[tuple[int, float, bool]] = []

    def judge(tree: DraftTree, answer: list[int]) -> DraftTree:
        rows.extend(judged_nodes(tree, answer))
        return tree

    replay(drafter, rid, ids, start, features, budget, judge)
    return rows


def table(rows: list[tuple[int, float, bool]]) -> list[dict]:
    """Per depth and probability bin: nodes, mean probability, acceptance rate."""
    arr = np.array(rows, dtype=np.float64).reshape(-1, 3)        # [N, 3] depth, p, accepted
    out = []
    for d in sorted({int(x) for x in arr[:, 0]}):
        mine = arr[arr[:, 0] == d]
        bins = np.clip(np.digitize(mine[:, 1], EDGES) - 1, 0, len(EDGES) - 2)
        for b in range(len(EDGES) - 1):
            sel = mine[bins == b]
            if len(sel):
                out.append({"depth": d, "bin": [EDGES[b], EDGES[b + 1]], "nodes": len(sel),
                            "mean_p": round(float(sel[:, 1].mean()), 4), "accept": round(float(sel[:, 2].mean()), 4)})
    return out


def plot(bins: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    for d in sorted({b["depth"] for b in bins}):
        mine = [b for b in bins if b["depth"] == d and b["nodes"] >= 20]
        ax.plot([b["mean_p"] for b in mine], [b["accept"] for b in mine], "o-", label=f"depth {d}")
    ax.set_xlabel("drafter probability given the parent")
    ax.set_ylabel("acceptance rate given the parent accepted")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="distillation folders, comma-joined; their last shards are judged")
    parser.add_argument("--heldout-shards", type=int, default=1)
    parser.add_argument("--eval", help="more distillation folders judged whole")
    parser.add_argument("--budget", type=int, default=32, help="draft nodes per step (tree shape as bench --compare)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-records", type=int, default=0, help="records per folder (0: all)")
    parser.add_argument("--drafter-path", help="EAGLE checkpoint (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = ServerConfig(drafter_path=args.drafter_path)
    cfg = ServerConfig(**merge_options(base.model_dump(), shape_for(args.budget)))
    held, _, replayed = replay_sets(args.data, args.heldout_shards, args.eval)
    target = hf_model(cfg)
    eagle, aux = eagle_checkpoint(cfg)
    drafter = model_drafter("eagle", cfg, target)
    per_folder = {}
    for folder, records in held.items():
        rows = []
        for r in tqdm(records[:args.max_records or None], desc=Path(folder).name, unit="rec"):
            ids = r["input_ids"][:r["prompt_len"] + args.max_tokens]
            feats = target_features(target, [ids], aux)[0]                        # [L, F]
            rows += collect(drafter, r["id"], ids, r["prompt_len"], feats, args.budget)
        per_folder[folder] = table(rows)
    report = {"command": "python -m bench.confidence " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "drafter": str(eagle), "budget": args.budget,
              "replayed_shards": replayed, "bins": per_folder}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for folder, bins in per_folder.items():
        plot(bins, out.with_name(f"{out.stem}_{Path(folder).name}.png"), f"EAGLE confidence vs acceptance · {Path(folder).name}")
    return report


if __name__ == "__main__":
    main()
