"""Offline replay of the hybrid drafter on held-out answers the target wrote: τ without a target in the loop.

A greedy answer from ``treespec distill`` is what the engine's greedy decoding commits, so verifying
any draft tree against it needs no target forward: after the prefill's token, each step the drafter
sees ``prompt + answer[:i]``, the step keeps the tree's longest path that spells ``answer[i:]`` and
commits it plus the target's next token, and the drafter learns from that as in serving
(:meth:`~drafters.hybrid.HybridDrafter.on_accept`, with the target's features of the fed positions from
one full forward of the record). τ is committed tokens per step, the server's acceptance length.

Variants: ``--drafters none`` (prompt and corpus lookup alone) and ``eagle`` (the default drafter: the
hybrid over the shipped, or ``--drafter-path``, EAGLE checkpoint), options as ``treespec bench --compare``
takes them (``eagle[draft_depth=6,hybrid.corpus_prior=0.6]``), each with a corpus index over a growing
share (``--fractions``, 0 = no corpus) of the training shards of ``--data``: every folder's shards but its
last ``--heldout-shards``, which are replayed (greedy records only), as are all of ``--eval``'s (such as
the target's greedy answers to MT-bench, which no corpus holds). Writes JSON (command, machine, date, τ
per variant and folder) and a PNG::

    python -m bench.lookup_replay --data drafters/data/smollm2-distill,drafters/data/smollm2-distill-self \\
        --eval bench/results/issue8/mtbench_answers --out bench/results/issue8/lookup_replay.json

Features come from one full-sequence forward, the engine's from incremental steps: equal up to rounding,
so an EAGLE draft can rarely differ from the served one; lookup variants are exact.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from bench.compare import parse_variant, shape_for
from bench.harness import hf_model, machine_info
from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.corpus import CorpusIndex
from drafters.eagle_model import EagleConfig
from drafters.hybrid import HybridDrafter
from drafters.registry import DRAFTERS, save_acceptance_profile, shipped_drafter
from drafters.train.distill import distill_shards
from drafters.train.features import data_folders, hold_out_last, shard_records, target_features
from drafters.tree import DraftTree, accepted_length
from server.config import ServerConfig, merge_options
from server.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0)


class NoModel(Drafter):
    """A model drafter that proposes nothing, so the hybrid's tree is its lookup tries alone."""

    name = "none"

    def __init__(self, max_tree_tokens: int):
        self.max_tree_tokens = max_tree_tokens

    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        return [DraftTree.empty() for _ in requests]


def replay(drafter: Drafter, rid: str, ids: list[int], start: int, features: torch.Tensor, budget: int,
           verified: Callable[[DraftTree, list[int]], DraftTree] | None = None) -> tuple[int, int]:
    """(tokens committed after the prefill's, verify steps) of greedy speculative decoding of ``ids`` (prompt
    of ``start`` tokens, then the answer; ``features [len(ids), F]`` the target's at every position).
    ``verified(tree, answer)``, if given, sees each step's drafted tree and the answer from there on, and returns
    the tree to verify (studies of trees and of trimming them)."""
    def commit(first: int, last: int, reset: bool = False) -> None:   # fed positions first..last-1, then ids[last]
        if last < len(ids):
            drafter.on_accept([AcceptUpdate(rid, first, ids[first:last], features[first:last], ids[last], reset)])

    commit(0, start, reset=True)                                  # prefill: the prompt, then answer[0]
    i, steps = start + 1, 0
    while i < len(ids):
        tree = drafter.propose([DraftRequest(rid, ids[:i], GREEDY, budget, start)])[0]
        n = accepted_length(verified(tree, ids[i:]) if verified else tree, ids[i:])
        commit(i - 1, i + n)
        i, steps = i + n + 1, steps + 1
    drafter.release(rid)
    return len(ids) - start - 1, steps


def eagle_checkpoint(cfg: ServerConfig) -> tuple[Path, tuple[int, ...]]:
    """The EAGLE checkpoint ``cfg`` drafts with (``drafter_path`` or the shipped one) and the target layers its
    features read besides the last hidden state (what ``target_features`` must extract)."""
    eagle = Path(cfg.drafter_path or shipped_drafter(cfg.model, "eagle"))
    return eagle, tuple(EagleConfig.from_dict(json.loads((eagle / "config.json").read_text())).aux_layers)


def replay_sets(data: str, heldout_shards: int, evals: str | None
                ) -> tuple[dict[str, list[dict]], list[list[Path]], dict[str, list[str]]]:
    """Greedy records to replay per folder, each ``data`` folder's training shards (in order), and the
    shard files replayed per folder."""
    replayed: dict[str, list[Path]] = {}
    train = []
    for folder in data_folders(data):
        shards, kept = hold_out_last([distill_shards(folder)], heldout_shards)
        if not shards:
            raise ValueError(f"{folder}: needs more than {heldout_shards} shard(s) to hold some out")
        replayed[str(folder)] = kept
        train.append(shards)
    for folder in data_folders(evals) if evals else []:
        replayed[str(folder)] = distill_shards(folder)
    held = {f: [r for p in paths for r in shard_records(p) if r["temperature"] == 0] for f, paths in replayed.items()}
    return held, train, {f: [p.name for p in paths] for f, paths in replayed.items()}


def corpus_for(train: list[list[Path]], fraction: float, options: dict) -> CorpusIndex | None:
    """An index of the answers in the first ``fraction`` of every folder's training shards (``None`` at 0)."""
    if fraction == 0:
        return None
    paths = [p for shards in train for p in shards[:max(1, round(fraction * len(shards)))]]
    return CorpusIndex.from_shards(map(shard_records, paths), **options)


def model_drafter(name: str, cfg: ServerConfig, target) -> Drafter:
    """The hybrid's model drafter: ``none`` or the registry's ``eagle`` (its checkpoint, dtype and tree shape)."""
    if name == "none":
        return NoModel(cfg.max_draft_tokens)
    return DRAFTERS[name](cfg, SimpleNamespace(embed_tokens=target.model.embed_tokens, lm_head=target.lm_head))


def label(spec: str, folder: str) -> str:
    kind = spec.replace("none", "lookup only", 1) if spec.startswith("none") else f"hybrid: {spec}"
    return f"{kind} · {Path(folder).name}"


def plot(rows: list[dict], path: Path) -> None:
    """τ against corpus size (at the smallest budget) and, with several budgets, against the budget (at the
    largest corpus)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows})
    fractions = sorted({r["fraction"] for r in rows})
    panels = [("corpus_tokens", "budget", budgets[0], "corpus size (million answer tokens; 0 = no corpus)")]
    if len(budgets) > 1:
        panels.append(("budget", "fraction", fractions[-1], "draft budget (tree nodes per step)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    for ax, (x, fixed, value, xlabel) in zip(axes[0], panels):
        for key in dict.fromkeys((r["drafter"], r["folder"]) for r in rows):
            mine = [r for r in rows if (r["drafter"], r["folder"]) == key and r[fixed] == value]
            scale = 1e6 if x == "corpus_tokens" else 1
            ax.plot([r[x] / scale for r in mine], [r["tau"] for r in mine],
                    "o-" if key[0].startswith("none") else "s--", label=label(*key))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("τ (tokens per verify step)")
        ax.set_title(f"{'budget' if fixed == 'budget' else 'corpus share'} {value:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Hybrid drafter replayed on held-out greedy answers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replay_variant(spec: str, cfg: ServerConfig, target, train: list[list[Path]], held: dict[str, list[dict]],
                   features: dict, fractions: list[float], budgets: list[int]) -> list[dict]:
    """One row per (corpus share, budget, folder) of one ``--drafters`` variant; each budget drafts with the
    tree shape ``treespec bench --compare`` gives it (``bench.compare.shape_for``)."""
    name, options = parse_variant(spec)
    configs = {b: ServerConfig(**merge_options(cfg.model_dump(), merge_options(shape_for(b), options))) for b in budgets}
    models = {b: model_drafter(name, c, target) for b, c in configs.items()}
    rows = []
    for fraction in fractions:
        t = time.perf_counter()
        corpus = corpus_for(train, fraction, configs[budgets[0]].hybrid.corpus_options())
        build_s = time.perf_counter() - t
        for budget in budgets:
            drafter = HybridDrafter(models[budget], configs[budget].hybrid, budget, corpus)
            for folder, records in held.items():
                tokens = steps = 0
                t = time.perf_counter()
                for r in tqdm(records, desc=f"{spec} {Path(folder).name} corpus {fraction:g} @{budget}", unit="rec"):
                    n, s = replay(drafter, r["id"], r["input_ids"], r["prompt_len"],
                                  features.get((folder, r["id"]), torch.empty(0)), budget)
                    tokens, steps = tokens + n, steps + s
                rows.append({"drafter": spec, "folder": folder, "fraction": fraction, "budget": budget,
                             "corpus_tokens": corpus.num_tokens if corpus else 0, "index_build_s": round(build_s, 2),
                             "records": len(records), "tokens": tokens, "steps": steps,
                             "tau": round(tokens / max(1, steps), 4),
                             "draft_ms_per_step": round(1000 * (time.perf_counter() - t) / max(1, steps), 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="distillation folders, comma-joined: corpus and held-out")
    parser.add_argument("--heldout-shards", type=int, default=1, help="last shards of each --data folder replayed")
    parser.add_argument("--eval", help="more distillation folders replayed whole (never in the corpus)")
    parser.add_argument("--drafters", nargs="+", default=["none", "eagle"],
                        help="the hybrid's model drafter: none (lookup alone) or eagle, with options as "
                             "NAME[option=value,...]")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                        help="shares of the training shards in the corpus index (0: no corpus)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8], help="draft nodes per step")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="answer tokens replayed per record (the MT-bench runs use 128; long answers of a small "
                             "model repeat themselves, which flatters lookup)")
    parser.add_argument("--max-records", type=int, default=0, help="records per folder (0: all)")
    parser.add_argument("--drafter-path", help="EAGLE checkpoint (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--save-acceptance", metavar="FOLDER",
                        help="write FOLDER/acceptance.json (start-up calibration's tau by budget) from the first "
                             "--drafters variant at the largest corpus share, pooled over the --eval folders")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if any(not 0 <= f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in [0, 1]")
    if min(args.budgets) < 1:
        parser.error("--budgets must be positive")
    if bad := [spec for spec in args.drafters if parse_variant(spec)[0] not in ("none", "eagle")]:
        parser.error(f"--drafters: unknown model drafter in {bad}; choose none or eagle")
    if args.save_acceptance and not args.eval:
        parser.error("--save-acceptance needs --eval (answers no corpus shard holds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ServerConfig(drafter_path=args.drafter_path)
    held, train, replayed = replay_sets(args.data, args.heldout_shards, args.eval)
    held = {f: [{**r, "input_ids": r["input_ids"][:r["prompt_len"] + args.max_tokens]}
                for r in records[:args.max_records or None]] for f, records in held.items()}
    target = hf_model(cfg) if any(parse_variant(s)[0] == "eagle" for s in args.drafters) else None
    features = {}
    if target is not None:
        _, aux = eagle_checkpoint(cfg)
        for f, records in held.items():
            for r in tqdm(records, desc=f"features {Path(f).name}", unit="rec"):
                features[f, r["id"]] = target_features(target, [r["input_ids"]], aux)[0]   # [L, (1 + k) H]
    rows = [row for spec in args.drafters
            for row in replay_variant(spec, cfg, target, train, held, features, args.fractions, args.budgets)]
    report = {"command": "python -m bench.lookup_replay " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "max_tokens": args.max_tokens, "heldout_shards": args.heldout_shards,
              "replayed_shards": replayed, "hybrid": cfg.hybrid.model_dump(), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    if args.save_acceptance:
        save_acceptance(report, data_folders(args.eval), Path(args.save_acceptance), out)
    return report


def save_acceptance(report: dict, evals: list[Path], folder: Path, source: Path) -> None:
    """``acceptance.json`` in ``folder``: per budget, τ of the report's first variant at its largest corpus
    share over the ``evals`` folders' records together (tokens / steps)."""
    first = report["results"][0]["drafter"]
    share = max(r["fraction"] for r in report["results"] if r["drafter"] == first)
    mine = [r for r in report["results"] if r["drafter"] == first and r["fraction"] == share
            and Path(r["folder"]) in evals]
    tau = {b: sum(r["tokens"] for r in mine if r["budget"] == b) / sum(r["steps"] for r in mine if r["budget"] == b)
           for b in {r["budget"] for r in mine}}
    folder.mkdir(parents=True, exist_ok=True)
    path = save_acceptance_profile(folder, tau, source=str(source), date=report["date"], variant=first,
                                   corpus_share=share, replayed=[str(f) for f in evals],
                                   max_new_tokens=report["max_tokens"],
                                   note="greedy; offline replay (bench/lookup_replay.py) of the target's own "
                                        "answers; tree shape per budget as bench/compare.py:shape_for")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
