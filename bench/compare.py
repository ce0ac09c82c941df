"""``treespec bench --compare eagle gumiho --budgets 16 32 64``: drafters at equal verify budgets, one run.

Plain decoding runs once as the baseline; then every (drafter, budget) pair runs on the same
questions in the same process (with ``--rounds R``, interleaved: R parts, plain and every variant on each), with start-up calibration off so the budget is exactly the
one named. The variant ``default`` is the served configuration itself (the preset's drafter, ``auto``
unless set, with start-up calibration and load-aware budgets, exactly what ``make serve`` runs);
it runs once, not per budget. Tree shape per budget (both drafters): ``top_k = max(4, budget // 8)``; depth is the
drafter's own default (EAGLE-2 5, Gumiho 6 = 2 serial + 5 MLP tokens); Gumiho's
``mlptopk = pruning = budget // 2`` (its scripts use 35 at 64). A variant may set options:
``medusa[medusa.tree=static]``, ``gsd[gsd.repeat_threshold=-1,draft_top_k=2]`` (a drafter's option group
field or a top-level setting; values read as YAML scalars). Writes one JSON with a
table (per category and overall: tau, tokens/s, speedup, identical_to_baseline) and a PNG.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bench.report import method_results
from bench.runner import StepProfile, run_engine
from server.config import ServerConfig, merge_options

VARIANT = re.compile(r"([\w-]+)(?:\[(.*)\])?")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"gsd[gsd.repeat_threshold=-1]"`` -> ``("gsd", {"gsd": {"repeat_threshold": -1}})``."""
    match = VARIANT.fullmatch(spec)
    if match is None:
        raise ValueError(f"bad variant {spec!r}: expected NAME or NAME[option=value,...]")
    name, body = match.groups()
    options: dict = {}
    for item in filter(None, (body or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad option {item!r} in {spec!r}: expected option=value")
        *groups, leaf = key.strip().split(".")
        node = options
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = yaml.safe_load(value)
    return name, options


def shape_for(budget: int) -> dict:
    """Tree options for a verify budget (documented above)."""
    return {"max_draft_tokens": budget, "draft_top_k": max(4, budget // 8), "draft_depth": None,
            "draft_pruning": max(1, budget // 2), "calibrate_tree": False}


def variant_configs(cfg: ServerConfig, drafters: list[str], budgets: list[int], served: ServerConfig | None
                    ) -> dict[str, tuple[ServerConfig, dict]]:
    """Key (``default``, ``eagle@16``, ...) -> (configuration, what the report says of it), in run order."""
    out = {}
    if "default" in drafters:
        served = served or cfg
        out["default"] = (served, {"drafter": "default", "budget": None,
                                   "shape": {"drafter": served.drafter, "calibrate_tree": served.calibrate_tree}})
    for budget in budgets:
        for spec in (d for d in drafters if d != "default"):
            name, options = parse_variant(spec)
            update = merge_options({"drafter": name, **shape_for(budget)}, options)
            out[f"{spec}@{budget}"] = (ServerConfig(**merge_options(cfg.model_dump(), update)),
                                       {"drafter": name, "variant": spec, "budget": budget, "shape": update})
    return out


def run_compare(plain, cfg: ServerConfig, prompts, max_new_tokens: int, concurrency: int, drafters: list[str],
                budgets: list[int], warmup: int, served: ServerConfig | None = None, rounds: int = 1) -> dict:
    """``{"baseline": ..., "variants": {"eagle@16": {...}, "default": {...}, ...}}`` measured in this process;
    ``plain`` is an engine without a drafter (the baseline), ``cfg`` the settings every variant starts from,
    ``served`` the configuration the ``default`` variant runs (default: ``cfg``).

    ``rounds > 1`` splits the questions into that many interleaved parts; each round runs plain decoding and
    every variant on its part, the order rotating by one from round to round, so the host's drift over the run
    falls on all of them alike (every engine stays built for the whole run). With one round each variant's
    engine is built when its turn comes and dropped after it."""
    from server.build import build_engine

    warm = prompts[:1] * warmup
    variants = variant_configs(cfg, drafters, budgets, served)
    keys = ["plain", *variants]
    engines = {"plain": plain}
    profiles = {key: StepProfile() for key in variants}
    rows: dict[str, list] = {key: [] for key in keys}
    walls = dict.fromkeys(keys, 0.0)
    reports = {}
    run_engine(plain, warm, max_new_tokens, 1, "warm-up")
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if key not in engines:
                engines[key] = build_engine(variants[key][0])[0]
                run_engine(engines[key], warm, max_new_tokens, 1, "warm-up")
            label = "plain decoding" if key == "plain" else key
            got, wall = run_engine(engines[key], prompts[r::rounds], max_new_tokens, concurrency,
                                   label if rounds == 1 else f"{label} ({r + 1}/{rounds})", profiles.get(key))
            rows[key] += got
            walls[key] += wall
            if r == rounds - 1 and key != "plain":
                drafter = (engines.pop(key) if rounds == 1 else engines[key]).runner.drafter
                if drafter is not None and (report := drafter.bench_report()):
                    reports[key] = report                # warm-up included (e.g. GSD's forward counts)
    out = {"baseline": method_results(rows["plain"], walls["plain"], None), "variants": {}, "rounds": rounds}
    for key, (_, info) in variants.items():
        out["variants"][key] = {**info, **method_results(rows[key], walls[key], rows["plain"]),
                                "step_time_breakdown_ms": profiles[key].mean_ms()}
        if key in reports:
            out["variants"][key]["drafter_report"] = reports[key]
    return out


def table(compare: dict) -> list[str]:
    """Markdown rows: variant, overall tau / tokens/s / speedup, then tau per category."""
    variants = compare["variants"]
    cats = list(next(iter(variants.values()))["per_category"]) if variants else []
    lines = ["| variant | tau | tokens/s | speedup | identical | " + " | ".join(f"tau {c}" for c in cats) + " |",
             "|---" * (5 + len(cats)) + "|"]
    base = compare["baseline"]["overall"]
    lines.append(f"| plain | 1.00 | {base['tokens_per_s']:.2f} | 1.00 | – | " + " | ".join("1.00" for _ in cats) + " |")
    for key, v in variants.items():
        o = v["overall"]
        lines.append(f"| {key} | {o['tau']:.2f} | {o['tokens_per_s']:.2f} | {o['speedup']:.2f} | "
                     f"{o['identical_to_baseline']} | "
                     + " | ".join(f"{v['per_category'][c]['tau']:.2f}" for c in cats) + " |")
    return lines


def plot_compare(compare: dict, path: Path) -> None:
    """tau per category (grouped bars per variant) and overall tau / speedup against budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = compare["variants"]
    cats = list(next(iter(variants.values()))["per_category"])
    fig, (ax_cat, ax_tau, ax_speed) = plt.subplots(1, 3, figsize=(20, 4.8))
    width = 0.8 / len(variants)
    for i, (key, v) in enumerate(variants.items()):
        ax_cat.bar([j + i * width for j in range(len(cats))], [v["per_category"][c]["tau"] for c in cats],
                   width, label=key)
    ax_cat.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    ax_cat.set_ylabel("tau (mean accepted length)")
    ax_cat.set_title("tau by category")
    ax_cat.legend(fontsize=8)
    for name in dict.fromkeys(v["drafter"] for v in variants.values()):
        mine = [v for v in variants.values() if v["drafter"] == name and v["budget"] is not None]
        if not mine:
            for ax, key in ((ax_tau, "tau"), (ax_speed, "speedup")):
                ax.axhline(variants[name]["overall"][key], color="black", linestyle=":", label=name)
            continue
        budgets = [v["budget"] for v in mine]
        ax_tau.plot(budgets, [v["overall"]["tau"] for v in mine], marker="o", label=name)
        ax_speed.plot(budgets, [v["overall"]["speedup"] for v in mine], marker="o", label=name)
    ax_speed.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    for ax, title in ((ax_tau, "overall tau vs verify budget"), (ax_speed, "speedup vs plain decoding")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("draft tree budget (nodes)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
