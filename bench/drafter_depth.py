"""Held-out top-1 agreement by draft depth for trained drafters.

For every start position of the held-out feature shards (the last ``--val-shards`` of each part of
``--work``, as training holds them out), each drafter drafts ``--depth`` tokens on its own features, as at
inference; depth d's top-1 is the share of starts whose d-th drafted token (mapped to the target's
vocabulary) equals the target's greedy token there, given the true tokens before it. Writes JSON
(command, machine, date, results) and a PNG::

    python -m bench.drafter_depth --work .cache/distill_features \\
        --drafter eagle=drafters/checkpoints/smollm2-eagle --drafter gumiho=drafters/checkpoints/smollm2-gumiho \\
        --out bench/results/drafter_depth.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench.harness import machine_info


def load_drafter(method: str, path: str, embed: torch.Tensor, lm_head: torch.Tensor):
    if method == "medusa":
        from drafters.medusa_model import load_medusa

        return load_medusa(path, lm_head)
    if method == "gumiho":
        from drafters.gumiho_model import load_gumiho_checkpoint

        return load_gumiho_checkpoint(path, embed, lm_head)
    from drafters.eagle_model import load_checkpoint

    return load_checkpoint(path, embed, lm_head)


def recipe_for(method: str):
    if method == "medusa":                          # depth d: head d - 1 (the target's own head drafts the root)
        from drafters.train.medusa import MedusaRecipe

        return MedusaRecipe()
    if method == "gumiho":
        from drafters.train.gumiho import GumihoRecipe

        return GumihoRecipe(mlp_num=5, mlp_res_blocks=1)
    from drafters.train.eagle import EagleRecipe

    return EagleRecipe()


@torch.no_grad()
def top1_by_depth(method: str, drafter, records, lm_head: torch.Tensor, depth: int, max_len: int,
                  batch_size: int = 8) -> list[float]:
    """Top-1 agreement at depths 1..``depth`` (fewer for Medusa with fewer heads) over every held-out record
    (first ``max_len`` positions)."""
    from drafters.train.loop import collate

    recipe, rng = recipe_for(method), random.Random(0)
    hits, total = [0.0] * depth, [0.0] * depth
    order = sorted(range(len(records)), key=records.length)
    for b in range(0, len(order), batch_size):
        batch = collate([records.window(i, max_len, rng) for i in order[b:b + batch_size]])
        for d, (h, n) in enumerate(recipe.top1_by_depth(drafter, batch, lm_head, depth)):
            hits[d] += h
            total[d] += n
    return [h / n for h, n in zip(hits, total) if n > 0]          # a drafter with fewer heads stops early


def plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in results.items():
        ax.plot(range(1, len(accs) + 1), accs, "o-", label=name)
    ax.set_xlabel("draft depth")
    ax.set_ylabel("held-out top-1 agreement")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True,
                        help="feature folder (drafters/train/features.py); a part's subfolder evaluates that part "
                             "alone")
    parser.add_argument("--drafter", action="append", required=True, metavar="METHOD=PATH",
                        help="eagle=, gumiho= or medusa=<checkpoint>; repeatable (NAME:METHOD=PATH names it)")
    parser.add_argument("--val-shards", type=int, default=1,
                        help="the last N feature shards of each part are held out")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True, help="JSON path (a PNG is written beside it)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from drafters.train.cli import target_head
    from drafters.train.features import META_FILE, held_out_shards
    from drafters.train.loop import ShardRecords

    meta = json.loads((Path(args.work) / META_FILE).read_text())
    _, embed, lm_head = target_head(meta["model"])
    records = ShardRecords(held_out_shards(args.work, args.val_shards))
    results = {}
    for spec in args.drafter:
        label, _, rest = spec.rpartition(":")
        method, _, path = rest.partition("=")
        drafter = load_drafter(method, path, embed.float(), lm_head.float()).float()
        results[label or method] = top1_by_depth(method, drafter, records, lm_head.float(), args.depth,
                                                 args.max_len)
        print(label or method, " ".join(f"{a:.3f}" for a in results[label or method]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m bench.drafter_depth " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M"), "held_out": {"work": args.work, "records": len(records),
                                                      "data": meta.get("data")},
              "top1_by_depth": results}
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
