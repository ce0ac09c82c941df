"""Self-generated training prompts (Magpie, arXiv 2406.08464): the target writes the user turns.

The shared training prompts cover four sources (code, math word problems, role-play, tool use), and
drafters trained on the target's answers to them accept far fewer tokens on other domains (MT-bench
writing, humanities, STEM; bench/results/README.md, "Issue 11 combined"). An aligned chat model given
only its template's text up to the start of a user turn (the *pre-query*, system prompt included)
samples a user request from its own distribution of conversations, and ends it with the end-of-turn
token. ``treespec self-prompts`` collects such requests through the engine with continuous batching
and writes them in the training-prompt format, ready for ``treespec distill --data``::

    {"id": "self-000042", "source": "self-prompt", "prompt": "...", "response": ""}

Request ``k`` samples with seed ``seed * 1_000_003 + k``. Kept: requests that ended with the end-of-turn
token, at least ``min_chars`` long, not a repeat (case and whitespace folded) of an earlier one or of
a prompt in the ``avoid`` files (``--avoid``: the files written before, so sets stay disjoint). The file
is appended as requests finish, so a rerun resumes after the last attempt recorded in ``<out>.meta.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

SOURCE = "self-prompt"
_MARK = "\x00user query\x00"


def pre_query_ids(tokenizer: Any) -> list[int]:
    """Token ids of the chat template's text before a user message (system prompt and user header)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    if _MARK not in text:
        raise ValueError("the chat template does not render the user message verbatim")
    return tokenizer.encode(text[:text.index(_MARK)], add_special_tokens=False)


def record_id(seed: int, attempt: int) -> str:
    """``self-000042`` for seed 0 (the first file's ids), ``self-s1-000042`` for seed 1: files written with
    different seeds can be distilled and trained on together without id clashes."""
    return f"self-{attempt:06d}" if seed == 0 else f"self-s{seed}-{attempt:06d}"


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def _meta_file(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def prompts_in(paths: Iterable[str | Path]) -> set[str]:
    """The normalised prompts of the JSONL files ``paths``."""
    found = set()
    for path in paths:
        with open(path) as f:
            found |= {normalised(json.loads(line)["prompt"]) for line in f if line.strip()}
    return found


def _state(out: Path) -> tuple[dict[str, Any], set[str]]:
    """The run's counters (``<out>.meta.json``) and the normalised prompts already kept."""
    meta_file = _meta_file(out)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {
        "attempts": 0, "kept": 0, "dropped": {"length": 0, "short": 0, "repeat": 0}}
    seen = prompts_in([out] if out.is_file() else [])
    meta["kept"] = len(seen)
    return meta, seen


def generate_prompts(engine: Any, out: str | Path, num: int, *, seed: int = 0, temperature: float = 1.0,
                     top_p: float = 0.95, max_tokens: int = 128, min_chars: int = 16,
                     in_flight: int = 64, avoid: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Append self-generated prompts to ``out`` until it holds ``num`` (none found in the ``avoid`` files);
    returns the run's counters."""
    from server.engine.request import SamplingParams

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, seen = _state(out)
    avoided = prompts_in(avoid)
    meta.update(seed=seed, temperature=temperature, top_p=top_p, max_tokens=max_tokens, min_chars=min_chars)
    prefix = pre_query_ids(engine.tokenizer)
    meta_file = _meta_file(out)
    tokens: dict[str, list[int]] = {}                       # request id (its attempt number) -> tokens so far
    next_attempt = meta["attempts"]                         # a resumed run skips the attempts it had in flight
    with open(out, "a") as sink, tqdm(total=num, initial=min(len(seen), num), desc="self-prompts",
                                      unit="prompt") as bar:
        while len(seen) < num:
            while len(tokens) < min(in_flight, 2 * (num - len(seen))):
                engine.add_request(str(next_attempt), prefix, SamplingParams(
                    max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + next_attempt))
                tokens[str(next_attempt)] = []
                next_attempt += 1
            outputs, _ = engine.step()
            for o in outputs:
                tokens[o.request_id].extend(o.token_ids)
                if not o.finished or len(seen) >= num:
                    continue
                text = engine.tokenizer.decode(tokens.pop(o.request_id), skip_special_tokens=True).strip()
                key = normalised(text)
                meta["attempts"] = next_attempt
                reason = ("length" if o.finish_reason != "stop" else "short" if len(text) < min_chars
                          else "repeat" if key in seen or key in avoided else None)
                if reason:
                    meta["dropped"][reason] += 1
                    continue
                seen.add(key)
                sink.write(json.dumps({"id": record_id(seed, int(o.request_id)), "source": SOURCE, "prompt": text,
                                       "response": ""}) + "\n")
                sink.flush()
                meta["kept"] = len(seen)
                meta_file.write_text(json.dumps(meta, indent=2))
                bar.update(1)
    for rid in tokens:                                      # over-submitted attempts still running
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    meta_file.write_text(json.dumps(meta, indent=2))
    return meta


def add_self_prompt_flags(parser: argparse.ArgumentParser) -> None:
    """``treespec self-prompts`` flags (the engine's own flags come from ``ServerConfig``)."""
    g = parser.add_argument_group("self-prompts")
    g.add_argument("--out", required=True, help="JSONL of prompts (appended; resumable)")
    g.add_argument("--num", type=int, required=True, help="prompts the file should hold")
    g.add_argument("--seed", type=int, default=0, help="request k samples with seed * 1000003 + k")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the user turns")
    g.add_argument("--top-p", type=float, default=0.95, help="top-p of the user turns")
    g.add_argument("--max-prompt-tokens", type=int, default=128, help="longer user turns are dropped")
    g.add_argument("--min-chars", type=int, default=16, help="shorter user turns are dropped")
    g.add_argument("--in-flight", type=int, default=64, help="requests generated at once")
    g.add_argument("--avoid", default="", help="comma-separated prompt files written before: their prompts "
                                               "count as repeats")


def run_self_prompts(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Build a drafter-free engine from ``cfg`` (a ``ServerConfig``) and generate with ``args``."""
    from server.build import build_engine

    engine, _ = build_engine(cfg.model_copy(update={"drafter": "none"}))
    summary = generate_prompts(engine, args.out, args.num, seed=args.seed, temperature=args.temperature,
                               top_p=args.top_p, max_tokens=args.max_prompt_tokens, min_chars=args.min_chars,
                               in_flight=args.in_flight, avoid=[p for p in args.avoid.split(",") if p])
    print(json.dumps(summary, indent=2))
    return summary
