"""Long prompts: prefill time against prompt length, and the stall a long prompt causes the streams
running beside it (head-of-line blocking), measured in-process on ``LLMEngine`` (no HTTP).

``prefill``: one request of ``n`` prompt tokens and one output token, its time to first token.
``gap``: ``--streams`` greedy requests generate; once each has produced tokens, a ``--long``-token
prompt arrives; the largest time between two consecutive tokens of any running stream while the long
prompt is prefilled is the stall (the issue's target is <= 1 s on the 2-core CPU for 8k tokens).

Each configuration is a set of ServerConfig overrides (``--config-json``); the same process measures
all of them, so their ratios are comparable::

    python -m bench.long_prompt --out bench/results/long_prompt.json \\
        --variant chunked '{}' --variant unchunked '{"max_num_batched_tokens": 8192, "max_prefill_attention": 0}'
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

from bench.harness import machine_info
from server.build import build_engine
from server.config import ServerConfig
from server.engine.request import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def text_tokens(engine, n: int, data: Path) -> list[int]:
    """``n`` tokens of real text (training prompts concatenated), so attention sees a natural context."""
    ids: list[int] = []
    with data.open() as f:
        for line in f:
            ids.extend(engine.tokenizer.encode(json.loads(line)["prompt"] + "\n\n", add_special_tokens=False))
            if len(ids) >= n:
                return ids[:n]
    raise ValueError(f"{data} has fewer than {n} tokens")


def prefill_time(engine, ids: list[int]) -> float:
    engine.add_request("prefill", ids, SamplingParams(max_tokens=1, temperature=0.0))
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def stall(engine, streams: int, long_ids: list[int], short_ids: list[list[int]], warm_tokens: int) -> dict:
    """Token timestamps of ``streams`` running requests around the arrival of ``long_ids``."""
    greedy = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        engine.add_request(f"s{i}", short_ids[i], greedy)
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(streams)}
    arrival = first_token = None
    while first_token is None:
        outputs, _ = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.request_id == "long":
                first_token = now
            elif o.token_ids:
                times[o.request_id].append(now)
        if arrival is None and min(len(t) for t in times.values()) >= warm_tokens:
            engine.add_request("long", long_ids, SamplingParams(max_tokens=1, temperature=0.0))
            arrival = now
    for rid in list(times):
        engine.abort(rid)
    gaps = [b - a for t in times.values() for a, b in itertools.pairwise(t) if b > arrival and a < first_token]
    before = [b - a for t in times.values() for a, b in itertools.pairwise(t) if b <= arrival]
    return {"long_prompt_tokens": len(long_ids), "long_ttft_s": first_token - arrival,
            "max_gap_s": max(gaps), "median_gap_s": sorted(gaps)[len(gaps) // 2],
            "median_gap_before_s": sorted(before)[len(before) // 2],
            "timeline": {rid: [round(x - arrival, 4) for x in t] for rid, t in times.items()},
            "long_first_token_at_s": first_token - arrival}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        lengths = sorted(int(n) for n in r["prefill_s"])
        ax1.plot(lengths, [r["prefill_s"][str(n)] for n in lengths], "o-", label=name)
        g = r["gap"]
        for i, ts in enumerate(g["timeline"].values()):
            ax2.plot(ts, [i + 0.1 * list(results).index(name)] * len(ts), "|", markersize=8,
                     label=name if i == 0 else None, color=f"C{list(results).index(name)}")
        ax2.axvspan(0, g["long_first_token_at_s"], alpha=0.08, color=f"C{list(results).index(name)}")
    ax1.set(xlabel="prompt tokens", ylabel="time to first token (s)", title="Prefill of one prompt")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set(xlabel="seconds since the long prompt arrived", ylabel="stream",
            title="Tokens of running streams while a long prompt is prefilled (shaded)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "CONFIG_JSON"), required=True,
                   help="a name and ServerConfig overrides as JSON (repeatable)")
    p.add_argument("--lengths", type=int, nargs="+", default=[469, 937, 1891, 3781, 7560])
    p.add_argument("--long", type=int, default=8000)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--warm-tokens", type=int, default=8)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "train_prompts.jsonl"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    results = {}
    for name, overrides in args.variant:
        engine, _ = build_engine(ServerConfig(**json.loads(overrides)))
        long_ids = text_tokens(engine, max(args.long, *args.lengths) + 64 * args.streams, Path(args.data))
        prefill = {str(n): round(prefill_time(engine, long_ids[:n]), 3) for n in args.lengths}
        shorts = [long_ids[-64 * (i + 1):][:64] for i in range(args.streams)]
        gap = stall(engine, args.streams, long_ids[:args.long], shorts, args.warm_tokens)
        results[name] = {"overrides": json.loads(overrides), "prefill_s": prefill, "gap": gap}
        print(name, json.dumps(prefill), {k: round(v, 3) for k, v in gap.items() if k.endswith("_s")}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m bench.long_prompt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
        "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
