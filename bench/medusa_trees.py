"""Medusa tree shapes offline: expected tokens per step of dynamic (MEDUSA+) vs static trees.

At every assistant position t of the held-out feature shards, the heads see the target's feature
``f_t`` (as at inference after the target produced ``x_{t+1}``, the tree's root) and each tree shape
is built from the same top-``--top-k`` candidates per head; its accepted length is the depth of the
deepest node whose whole path equals the target's greedy tokens ``x_{t+2} ..`` (greedy verification).
The figure per shape and budget is tau = 1 + mean accepted length. Deterministic and load-independent:
it isolates the tree's shape from the step cost. Shapes:

- ``dynamic``: MEDUSA+, the joint of each head's top-K softmax renormalised over the K (as served);
- ``dynamic_full``: the same search over the heads' full-vocabulary probabilities (not renormalised);
- ``static``: the checkpoint's ``static_tree.json`` (Medusa's simulation from held-out rank accuracies)::

    python -m bench.medusa_trees --work .cache/distill_work15 --medusa drafters/checkpoints/smollm2-medusa \\
        --budgets 8 16 32 --out bench/results/issue11/medusa_trees_offline.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import machine_info
from drafters.medusa_tree import (
    STATIC_TREE_FILE,
    build_tree,
    dynamic_tree,
    load_static_tree,
    static_tree,
    top_tuples,
)
from drafters.tree import DraftTree, accepted_length

SHAPES = ("dynamic", "dynamic_full", "static")


def trees_for(shape: str, logits: np.ndarray, logprobs: np.ndarray, ids: np.ndarray, budget: int,
              paths: list[tuple[int, ...]]) -> DraftTree:
    """One shape's tree from the heads' top-K ``logits``/full-vocabulary ``logprobs``/token ``ids`` ``[D, K]``."""
    if shape == "static":
        return static_tree(paths, logits, ids, budget)
    if shape == "dynamic":
        return dynamic_tree(logits, ids, budget)
    probs = np.exp(logprobs)
    return build_tree([node for node, _ in top_tuples(probs, budget)], ids, probs)


@torch.no_grad()
def simulate(heads, records, lm_head: torch.Tensor, paths, budgets: list[int], top_k: int, max_len: int,
             limit: int | None = None) -> dict[str, dict[int, float]]:
    """``{shape: {budget: tau}}`` over the held-out records' assistant positions with ``D`` greedy tokens ahead."""
    from drafters.train.loop import collate

    heads_n = heads.num_heads
    accepted = {(s, b): [] for s in SHAPES for b in budgets}
    rng, order = random.Random(0), list(range(len(records)))[:limit]
    for start in range(0, len(order), 8):
        batch = collate([records.window(i, max_len, rng) for i in order[start:start + 8]])
        mask = batch["mask"].bool()                                                   # [B, T]
        greedy = F.linear(batch["targets"], lm_head).argmax(-1)                       # [B, T] x_{t+2}
        logits = heads.logits(heads(batch["features"], heads_n)).float()              # [B, T, D, K_head]
        top, index = logits.topk(top_k, -1)                                           # [B, T, D, k]
        logprobs = logits.log_softmax(-1).gather(-1, index)                           # [B, T, D, k]
        ids = heads.to_target_ids(index)                                              # [B, T, D, k]
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1] - heads_n):
                if not mask[b, t:t + heads_n].all():
                    continue
                want = greedy[b, t:t + heads_n].tolist()
                args = (top[b, t].double().numpy(), logprobs[b, t].double().numpy(), ids[b, t].numpy())
                for shape in SHAPES:
                    for budget in budgets:
                        accepted[(shape, budget)].append(
                            accepted_length(trees_for(shape, *args, budget, paths), want))
    return {s: {b: 1.0 + float(np.mean(accepted[(s, b)])) for b in budgets} for s in SHAPES} | {
        "positions": len(accepted[(SHAPES[0], budgets[0])])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, help="feature folder (drafters/train/features.py)")
    parser.add_argument("--medusa", required=True, help="Medusa checkpoint folder (with static_tree.json)")
    parser.add_argument("--val-shards", type=int, default=1,
                        help="the last N feature shards of each part are held out")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--top-k", type=int, default=10, help="candidates per head (medusa.top_k)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out records")
    parser.add_argument("--out", required=True, help="JSON path")
    args = parser.parse_args(argv)
    from drafters.medusa_model import load_medusa
    from drafters.train.cli import target_head
    from drafters.train.features import META_FILE, held_out_shards
    from drafters.train.loop import ShardRecords

    meta = json.loads((Path(args.work) / META_FILE).read_text())
    lm_head = target_head(meta["model"])[2].float()
    heads = load_medusa(args.medusa, lm_head).float()
    paths = load_static_tree(Path(args.medusa) / STATIC_TREE_FILE)
    records = ShardRecords(held_out_shards(args.work, args.val_shards))
    taus = simulate(heads, records, lm_head, paths, args.budgets, args.top_k, args.max_len, args.limit)
    for shape in SHAPES:
        print(shape, " ".join(f"@{b}: {taus[shape][b]:.3f}" for b in args.budgets), flush=True)
    report = {"command": "python -m bench.medusa_trees " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "held_out": {"work": args.work, "records": min(len(records), args.limit or len(records))},
              "tau": taus}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
