"""``treespec bench``: run a Spec-Bench-format file through the engine (and baselines) and write JSON + PNG."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from bench.questions import load_questions
from bench.report import accepted_length_histogram, method_results, plot
from bench.runner import StepProfile, run_engine, run_hf
from server.config import ServerConfig, add_config_flags
from server.engine.budget_feedback import ServedBudgets
from server.worker.calibrate import measure_verify_cost

VERIFY_SIZES = [0, 1, 3, 7, 15, 23, 31, 47, 63, 95, 127]  # tree nodes; the forward has 1 + n tokens


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)
    g = parser.add_argument_group("benchmark")
    g.add_argument("--questions", default="../shared/data/mt_bench.jsonl", help="Spec-Bench-format JSONL file")
    g.add_argument("--limit", type=int, default=None, help="first N questions (after category filter)")
    g.add_argument("--categories", nargs="*", default=None, help="only these categories")
    g.add_argument("--per-category", type=int, default=None, help="first N questions of each category")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    g.add_argument("--baseline", action="store_true", help="also run plain decoding: speedup, identity")
    g.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate peer row")
    g.add_argument("--warmup", type=int, default=1, help="warm-up generations per method")
    g.add_argument("--rounds", type=int, default=1,
                   help="with --baseline or --compare: split the questions into this many interleaved parts and "
                        "run every method on each in turn, rotating which goes first (A B, B A, ... ; with "
                        "--compare every engine stays built), so that the host's drift over the run falls on "
                        "all alike")
    g.add_argument("--verify-cost", action="store_true",
                   help="also time target forwards against tree size (1..128 tokens, 256-token context)")
    g.add_argument("--compare", nargs="+", default=None, metavar="DRAFTER",
                   help="compare these drafters at each --budgets value against plain decoding, one run; "
                        "NAME[option=value,...] sets options, e.g. 'gsd[gsd.repeat_threshold=-1]'")
    g.add_argument("--budgets", nargs="+", type=int, default=[16, 32, 64], help="verify budgets for --compare")
    g.add_argument("--save-acceptance", action="store_true",
                   help="with --compare: write each drafter's tau by budget as acceptance.json beside its checkpoint")
    g.add_argument("--out", default="bench/results/bench.json", help="output JSON (a PNG is written beside it)")


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def build_prompts(engine, questions) -> list[tuple[object, str, list[int]]]:
    tok = engine.tokenizer
    out = []
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q.turns[0]}], tokenize=False,
                                       add_generation_prompt=True)
        out.append((q.question_id, q.category, tok.encode(text, add_special_tokens=False)))
    return out


def hf_model(cfg: ServerConfig):
    """The same weights in ``transformers`` (folders load as saved; GGUF via our loader)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from server.build import resolve_model_path
    from server.models.loader import load_weights

    dtype = getattr(torch, cfg.torch_dtype)
    path = resolve_model_path(cfg.model)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    hf_cfg, state = load_weights(path)
    rope = {"rope_type": "default", **(hf_cfg.get("rope_scaling") or {}), "rope_theta": hf_cfg["rope_theta"]}
    keys = LlamaConfig().to_dict().keys() - {"rope_parameters", "rope_scaling", "rope_theta"}
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k in keys}, rope_parameters=rope))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def run_bench(cfg: ServerConfig, args: argparse.Namespace) -> dict:
    from server.build import build_engine

    if args.concurrency < 1 or args.max_new_tokens < 1:
        raise SystemExit("--concurrency and --max-new-tokens must be >= 1")
    questions = load_questions(args.questions, args.limit, args.categories, args.per_category)
    if not questions:
        raise SystemExit(f"no questions selected from {args.questions}")
    cfg = served = cfg.model_copy(update={"max_num_seqs": max(cfg.max_num_seqs, args.concurrency)})
    if args.compare:
        cfg = cfg.model_copy(update={"drafter": "none"})          # the baseline; each variant builds its own
    engine, name = build_engine(cfg)
    drafter = engine.runner.drafter.name if engine.runner.drafter else "none"   # after auto
    prompts = build_prompts(engine, questions)
    warm = prompts[:1] * args.warmup
    report: dict = {
        "command": "treespec " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"model": name, "drafter": drafter, "drafter_flag": cfg.drafter,
                   "draft_budget": engine.scheduler.policy.budget(args.concurrency),
                   "draft_budget_by_batch_size": engine.scheduler.policy.table(), "questions": args.questions,
                   "num_questions": len(prompts), "max_new_tokens": args.max_new_tokens,
                   "concurrency": args.concurrency, "turns": "first", "greedy": True, "dtype": cfg.torch_dtype,
                   "max_draft_tokens": cfg.max_draft_tokens, "draft_depth": cfg.draft_depth,
                   "draft_top_k": cfg.draft_top_k},
    }
    if args.rounds < 1 or args.rounds > len(prompts):
        raise SystemExit(f"--rounds must be between 1 and the number of questions ({len(prompts)})")
    report["config"]["rounds"] = args.rounds
    if args.compare:
        return write_compare(cfg, args, engine, prompts, report, served)
    profile = StepProfile()
    run_engine(engine, warm, args.max_new_tokens, 1, "warm-up")
    plain = None
    if args.baseline:
        plain = engine if drafter == "none" else build_engine(cfg.model_copy(update={"drafter": "none"}))[0]
        run_engine(plain, warm, args.max_new_tokens, 1, "warm-up")
    (rows, wall), base = run_rounds(engine, drafter, plain, prompts, args, profile)
    report["step_time_breakdown_ms"] = profile.mean_ms()
    if isinstance(engine.scheduler.policy, ServedBudgets):   # what served steps made of calibration
        report["served_budgets"] = engine.scheduler.policy.report()
    if args.verify_cost:
        costs = measure_verify_cost(engine.runner, VERIFY_SIZES, context=256, repeats=5)
        report["verify_cost_ms"] = {"context_tokens": 256, "note": "target forward + LM head over 1 + n tokens",
                                    "ms": {n: 1000 * c for n, c in costs.items()},
                                    "relative_to_n0": {n: c / costs[0] for n, c in costs.items()}}
    baseline = None
    if base is not None:
        baseline, base_wall = base
        report["baseline"] = method_results(baseline, base_wall, None)
    report["results"] = method_results(rows, wall, baseline)
    drafter_report = engine.runner.drafter.bench_report() if engine.runner.drafter else None
    if drafter_report:
        report["drafter_report"] = drafter_report
    report["accepted_length_histogram"] = accepted_length_histogram(rows)
    if not args.no_hf:
        model = hf_model(cfg)
        run_hf(model, warm, args.max_new_tokens, list(engine.eos_token_ids), "HF warm-up")
        hf_rows, hf_wall = run_hf(model, prompts, args.max_new_tokens, list(engine.eos_token_ids), "HF generate")
        report["peer_hf_generate"] = method_results(hf_rows, hf_wall, None)
        report["peer_hf_generate"]["note"] = "transformers generate, greedy, batch 1, same prompts, same run"
        report["ratio_vs_hf_tokens_per_s"] = (report["results"]["overall"]["tokens_per_s"]
                                              / report["peer_hf_generate"]["overall"]["tokens_per_s"])
        report["identical_to_hf"] = all(a.token_ids == b.token_ids for a, b in zip(rows, hf_rows))
    report["questions"] = [{"question_id": r.question_id, "category": r.category, "new_tokens": r.new_tokens,
                            "wall_time": round(r.wall_time, 4), "verify_steps": r.verify_steps,
                            "accepted_tokens": r.accepted_tokens} for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print_summary(report, out)
    return report


def run_rounds(engine, drafter: str, plain, prompts, args: argparse.Namespace, profile: StepProfile):
    """The engine's (and, given ``plain``, the baseline's) rows and summed wall time over ``args.rounds``
    interleaved parts of the prompts, the order of the two alternating from part to part."""
    runs = [(engine, drafter, profile)] + ([(plain, "plain decoding", None)] if plain is not None else [])
    totals: list[tuple[list, float]] = [([], 0.0) for _ in runs]
    for r in range(args.rounds):
        order = list(enumerate(runs)) if r % 2 == 0 else list(enumerate(runs))[::-1]
        for i, (eng, desc, prof) in order:
            label = desc if args.rounds == 1 else f"{desc} ({r + 1}/{args.rounds})"
            rows, wall = run_engine(eng, prompts[r::args.rounds], args.max_new_tokens, args.concurrency, label, prof)
            totals[i] = (totals[i][0] + rows, totals[i][1] + wall)
    return totals[0], (totals[1] if plain is not None else None)


def write_compare(cfg: ServerConfig, args: argparse.Namespace, engine, prompts, report: dict,
                  served: ServerConfig) -> dict:
    """``--compare``: every drafter at every budget plus plain decoding (and ``default``: the ``served``
    configuration) -> JSON (with a table) and PNG."""
    from bench.compare import parse_variant, plot_compare, run_compare, table
    from drafters.registry import DRAFTERS

    choices = sorted(set(DRAFTERS) - {"none"} | {"default"})
    try:
        names = [parse_variant(d)[0] for d in args.compare]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if any(n not in choices for n in names) or min(args.budgets) < 1:
        raise SystemExit(f"--compare takes drafters from {choices} (NAME or NAME[option=value,...]) and "
                         "budgets >= 1")
    report["config"].update(drafter=None, compare=args.compare, budgets=args.budgets)
    report["compare"] = run_compare(engine, cfg, prompts, args.max_new_tokens, args.concurrency, args.compare,
                                    args.budgets, args.warmup, served, args.rounds)
    report["table"] = table(report["compare"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot_compare(report["compare"], out.with_suffix(".png"))
    if args.save_acceptance:
        for name in (d for d in args.compare if d != "default" and "[" not in d):   # variants with options: no
            save_acceptance(cfg, name, report, out)
    print("\n".join(report["table"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


def save_acceptance(cfg: ServerConfig, name: str, report: dict, source: Path) -> None:
    """``acceptance.json`` (tau by budget, for start-up calibration) beside the drafter's checkpoint."""
    from drafters.registry import save_acceptance_profile, shipped_drafter

    folder = Path(cfg.drafter_path) if cfg.drafter_path else shipped_drafter(cfg.model, name)
    if folder is None or not folder.is_dir():
        print(f"{name}: no checkpoint folder to write acceptance.json to")
        return
    runs = [v for v in report["compare"]["variants"].values() if v.get("variant") == name]  # without options
    path = save_acceptance_profile(folder, {v["budget"]: v["overall"]["tau"] for v in runs},
                                   source=str(source), date=report["date"], questions=report["config"]["questions"],
                                   num_questions=report["config"]["num_questions"],
                                   max_new_tokens=report["config"]["max_new_tokens"],
                                   note="greedy; tree shape per budget as bench/compare.py:shape_for")
    print(f"wrote {path}")


def print_summary(report: dict, out: Path) -> None:
    o = report["results"]["overall"]
    line = f"{report['config']['drafter']}: {o['tokens_per_s']:.2f} tok/s/question, tau {o['tau']:.2f}"
    if "aggregate_tokens_per_s" in o:
        line += f", aggregate {o['aggregate_tokens_per_s']:.2f} tok/s"
    if "speedup" in o:
        line += f", speedup {o['speedup']:.2f}x, identical={o['identical_to_baseline']}"
    if "ratio_vs_hf_tokens_per_s" in report:
        line += f"; vs HF generate {report['ratio_vs_hf_tokens_per_s']:.2f}x (identical={report['identical_to_hf']})"
    print(line)
    print(f"wrote {out} and {out.with_suffix('.png')}")
