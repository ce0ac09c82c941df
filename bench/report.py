"""Aggregate benchmark rows (Spec-Bench definitions) and draw the plots."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from bench.runner import Row


def summarize(rows: list[Row], wall_time: float | None = None) -> dict:
    """tokens_per_s = mean of per-question tokens/s; tau pooled over verify steps (1.0 without drafts)."""
    steps = sum(r.verify_steps for r in rows)
    out = {
        "num_questions": len(rows),
        "new_tokens": sum(r.new_tokens for r in rows),
        "tokens_per_s": sum(r.tokens_per_s for r in rows) / len(rows) if rows else 0.0,
        "tau": (sum(r.accepted_tokens for r in rows) + steps) / steps if steps else 1.0,
    }
    if wall_time:
        out["wall_time_s"] = wall_time
        out["aggregate_tokens_per_s"] = out["new_tokens"] / wall_time
    return out


def by_category(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.category].append(r)
    return dict(sorted(groups.items()))


def method_results(rows: list[Row], wall: float, baseline: list[Row] | None) -> dict:
    """``{"overall": {...}, "per_category": {...}}`` with speedup/identity against a baseline if given."""
    base_by_q = {r.question_id: r for r in baseline} if baseline else {}

    def block(group: list[Row], wall_time: float | None = None) -> dict:
        s = summarize(group, wall_time)
        if baseline is not None:
            base = [base_by_q[r.question_id] for r in group]
            s["speedup"] = s["tokens_per_s"] / summarize(base)["tokens_per_s"]
            same = [r.token_ids == b.token_ids for r, b in zip(group, base)]
            s["identical_to_baseline"] = all(same)
            s["identical_rate"] = sum(same) / len(same)   # < 1 in bf16 where near-ties flip (report, not hide)
        return s

    return {"overall": block(rows, wall), "per_category": {c: block(g) for c, g in by_category(rows).items()}}


def accepted_length_histogram(rows: list[Row]) -> dict[int, int]:
    return dict(sorted(Counter(n for r in rows for n in r.accept_lengths).items()))


def plot(report: dict, path: Path) -> None:
    """Tokens/s and tau per category for every method in the report, plus accepted-length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost = (report.get("verify_cost_ms") or {}).get("ms")
    methods = {name: report[key] for name, key in (("method", "results"), ("baseline", "baseline"),
                                                   ("HF generate", "peer_hf_generate")) if report.get(key)}
    cats = list(report["results"]["per_category"])
    fig, axes = plt.subplots(1, 4 if cost else 3, figsize=(22 if cost else 17, 4.8))
    width = 0.8 / max(1, len(methods))
    for i, (name, res) in enumerate(methods.items()):
        xs = [j + i * width for j in range(len(cats))]
        axes[0].bar(xs, [res["per_category"][c]["tokens_per_s"] for c in cats], width, label=name)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
    axes[0].set_ylabel("tokens/s (mean per question)")
    axes[0].set_title(f"Throughput, drafter={report['config']['drafter']}, "
                      f"concurrency={report['config']['concurrency']}")
    axes[0].legend()
    axes[1].bar(cats, [report["results"]["per_category"][c]["tau"] for c in cats], color="tab:green")
    axes[1].set_ylabel("tau (mean accepted length)")
    axes[1].set_title(f"tau by category (overall {report['results']['overall']['tau']:.2f})")
    axes[1].tick_params(axis="x", rotation=30)
    hist = report.get("accepted_length_histogram") or {}
    axes[2].bar([int(k) for k in hist], list(hist.values()), color="tab:purple")
    axes[2].set_xlabel("tokens committed per step")
    axes[2].set_ylabel("steps")
    axes[2].set_title("Accepted length per verify step")
    if cost:
        sizes = [int(n) + 1 for n in cost]
        axes[3].plot(sizes, list(cost.values()), marker="o")
        axes[3].set_xscale("log", base=2)
        axes[3].set_xlabel("tokens in the verify forward (root + tree)")
        axes[3].set_ylabel("ms per target forward")
        axes[3].set_title("Verify cost vs tree size (256-token context)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    tasks = (report.get("drafter_report") or {}).get("tasks")
    if tasks:
        plot_matchness(tasks, path.with_name(path.stem + "_matchness.png"))


def plot_matchness(tasks: dict, path: Path) -> None:
    """SWIFT's layer search: each candidate's matchness and the best so far, per task, over iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (key, task) in enumerate(tasks.items()):
        its, scores, best = zip(*task["history"]) if task["history"] else ((), (), ())
        ax.scatter(its, scores, s=8, alpha=0.4, color=f"C{i}")
        ax.step(its, best, where="post", color=f"C{i}",
                label=f"{key}: best {task['best_matchness']:.2f}, skipping {task['skip_ratio']:.0%}")
    ax.set(xlabel="search iteration (one per decoding step)", ylabel="matchness",
           title="SWIFT layer-set search: candidates (dots) and the set in force (line)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
