"""Target-feature extraction for drafter training.

Each record (``prompt``, ``response``) is rendered with the target's chat template, tokenised,
truncated to ``max_len`` and run through the target. ``--data`` may also be a self-distillation
folder (``drafters/train/distill.py``): its records are token ids already, the target's own answers.
The last hidden state (post final RMSNorm, the EAGLE feature) is stored per token, and with ``aux_layers``
the outputs of those decoder layers (0-based) too, side by side (EAGLE-3's low/mid/high features). JSONL records are
shuffled with ``seed`` and split into shards of ``shard_size`` records; a distillation folder's
records keep its shards (already shuffled by ``treespec distill``), one feature shard per
distillation shard, so a folder that grew since its extraction only adds feature shards. Shards are
written as ``shard_00000.pt`` dicts::

    input_ids  int32 [N]       features  fp16 [N, H]      loss_mask  bool [N] (assistant tokens)
    offsets    int64 [R + 1]   record_ids list[str]       aux       fp16 [N, k * H] (with k aux_layers)

Finished shards are skipped on a rerun (resumable). ``token_freq.pt`` (int64 ``[V]``, counts of
assistant tokens, for FR-Spec truncated heads) and ``meta.json`` (``"complete": true``) close a run.

Several distillation folders (``--data A,B``) are extracted part by part, each into
``<work>/<folder name>/``, so adding a folder reuses the features of the others; ``<work>`` then
holds the summed ``token_freq.pt`` and a ``meta.json`` naming its ``parts``. Held-out shards are
the last ``val_shards`` of each part (``split_shards``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from drafters.eagle_model import FREQ_FILE

META_FILE = "meta.json"
log = logging.getLogger(__name__)


def data_folders(data: str | Path) -> list[Path]:
    """The folders of ``--data``: one path, or several joined by commas (e.g. two distillation runs)."""
    return [Path(p) for p in str(data).split(",") if p]


def is_distilled(data: str | Path) -> bool:
    return all(folder.is_dir() for folder in data_folders(data))


def shard_records(path: Path) -> list[dict[str, Any]]:
    """Records of one distillation shard: ``id``, ``input_ids`` (prompt + answer), ``prompt_len`` and
    ``temperature`` (0: the target's greedy answer)."""
    import numpy as np

    with np.load(path) as shard:
        tokens, bounds = shard["tokens"].astype(np.int64), shard["offsets"]
        return [{"id": str(rid), "input_ids": tokens[bounds[r]:bounds[r + 1]].tolist(), "prompt_len": int(plen),
                 "temperature": float(temp)}
                for r, (rid, plen, temp) in enumerate(zip(shard["record_ids"], shard["prompt_lens"],
                                                          shard["temperature"]))]


def distilled_shards(data: str | Path) -> list[list[dict[str, Any]]]:
    """Records of one or more (comma-joined) distillation folders, one list per shard, folder by folder in
    shard order."""
    from drafters.train.distill import distill_shards

    shards = []
    for folder in data_folders(data):
        paths = distill_shards(folder)
        if not paths:
            raise FileNotFoundError(f"no distillation shards (shard_*.npz) in {folder}")
        shards += [shard_records(path) for path in paths]
    return shards


def load_records(path: str | Path, limit: int | None, seed: int) -> list[dict[str, Any]]:
    """Records of a JSONL file (``id``, ``prompt``, ``response``) or of distillation folders (comma-joined),
    shuffled by ``seed``, first ``limit``."""
    if is_distilled(path):
        records = [record for shard in distilled_shards(path) for record in shard]
    else:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    random.Random(seed).shuffle(records)
    return records[:limit] if limit else records


def tokenize_record(tokenizer: Any, record: dict[str, Any], max_len: int) -> tuple[list[int], list[bool]]:
    """Chat-template token ids (truncated to ``max_len``) and a mask that is True on assistant tokens."""
    if "input_ids" in record:                                      # distilled: ids already
        ids = record["input_ids"][:max_len]
        return ids, [i >= record["prompt_len"] for i in range(len(ids))]
    user = [{"role": "user", "content": record["prompt"]}]
    full = user + [{"role": "assistant", "content": record["response"]}]
    text = tokenizer.apply_chat_template(full, tokenize=False)
    prefix_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    prefix = tokenizer.encode(prefix_text, add_special_tokens=False)
    start = next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))
    ids = ids[:max_len]
    return ids, [i >= start for i in range(len(ids))]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices of similar length so that ``max length * count <= batch_tokens`` (at least one each)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[i] * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def target_features(model: Any, batch: list[list[int]], aux_layers: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """Post-norm last hidden states of a right-padded batch: one ``[n_i, H]`` fp32 tensor per sequence, or
    ``[n_i, (1 + k) H]`` with the outputs of the ``k`` decoder layers ``aux_layers`` after it."""
    longest = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), longest, dtype=torch.long)   # [B, T]
    attention = torch.zeros(len(batch), longest, dtype=torch.long)   # [B, T]
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    out = model.model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                      output_hidden_states=True)
    states = [out.hidden_states[-1]] + [out.hidden_states[i + 1] for i in aux_layers]   # [B, T, H] each
    hidden = torch.cat(states, dim=-1).float().cpu()                 # [B, T, (1 + k) H]
    return [hidden[row, :len(ids)] for row, ids in enumerate(batch)]


@torch.inference_mode()
def check_post_norm(model: Any, ids: list[int]) -> None:
    """Raise unless the last hidden state equals the output of the target's final norm."""
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        feature = target_features(model, [ids])[0]                   # [n, H]
    finally:
        hook.remove()
    if not torch.allclose(feature, captured[0][0].float().cpu(), atol=1e-5):
        raise RuntimeError("the last hidden state is not the post-norm feature")


def extract_shard(model: Any, tokenizer: Any, records: list[dict[str, Any]], max_len: int,
                  batch_tokens: int, progress: tqdm | None = None, aux_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """Features of one shard's records (batched by similar length), concatenated in record order."""
    encoded = [tokenize_record(tokenizer, r, max_len) for r in records]
    feats: list[torch.Tensor | None] = [None] * len(records)
    for batch in length_batches([len(ids) for ids, _ in encoded], batch_tokens):
        for i, f in zip(batch, target_features(model, [encoded[i][0] for i in batch], aux_layers)):
            feats[i] = f.half()
        if progress is not None:
            progress.update(len(batch))
    lengths = torch.tensor([len(ids) for ids, _ in encoded])
    hidden = model.config.hidden_size
    everything = torch.cat(feats)                                                              # [N, (1 + k) H]
    aux = {"aux": everything[:, hidden:].contiguous()} if aux_layers else {}
    return {
        "input_ids": torch.tensor([t for ids, _ in encoded for t in ids], dtype=torch.int32),  # [N]
        "features": everything[:, :hidden].contiguous(),                                       # [N, H]
        "loss_mask": torch.tensor([m for _, mask in encoded for m in mask], dtype=torch.bool),  # [N]
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),           # [R + 1]
        "record_ids": [str(r.get("id", "")) for r in records],
        **aux,                                                                                 # [N, k * H]
    }


def shard_paths(work: str | Path) -> list[Path]:
    return sorted(Path(work).glob("shard_*.pt"))


def part_folders(work: str | Path) -> list[Path]:
    """The folders of ``work``'s parts (``work`` itself unless its meta names parts)."""
    meta_file = Path(work) / META_FILE
    parts = json.loads(meta_file.read_text()).get("parts") if meta_file.is_file() else None
    return [Path(work) / name for name in parts] if parts else [Path(work)]


def shard_groups(work: str | Path) -> list[list[Path]]:
    """The feature shards of ``work``, one list per part (a single list unless its meta names parts)."""
    return [shard_paths(folder) for folder in part_folders(work)]


def stored_aux_layers(work: str | Path) -> tuple[int, ...] | None:
    """The ``aux_layers`` every part of ``work`` holds (None when the parts differ)."""
    metas = [folder / META_FILE for folder in part_folders(work)]
    held = {tuple(json.loads(m.read_text()).get("aux_layers", ())) if m.is_file() else () for m in metas}
    return held.pop() if len(held) == 1 else None


def held_out_shards(work: str | Path, val_shards: int) -> list[Path]:
    """The last ``val_shards`` shards of each part of ``work``."""
    return [p for group in shard_groups(work) for p in group[len(group) - min(val_shards, len(group)):]]


def hold_out_last(groups: list[list[Path]], val_shards: int) -> tuple[list[Path], list[Path]]:
    """(training, held-out) shards: each group holds out its last ``val_shards`` when it has more than that."""
    train: list[Path] = []
    held: list[Path] = []
    for group in groups:
        n = len(group) - (val_shards if len(group) > val_shards else 0)
        train, held = train + group[:n], held + group[n:]
    return train, held


def split_shards(work: str | Path, val_shards: int) -> tuple[list[Path], list[Path]]:
    """(training, held-out) feature shards: each part of ``work`` holds out its last ``val_shards``."""
    return hold_out_last(shard_groups(work), val_shards)


def features_complete(work: str | Path, run: dict[str, Any], num_shards: int | None = None) -> bool:
    """True when ``work`` holds a finished extraction of ``run`` (of ``num_shards`` shards, when given);
    raises if it holds another run's."""
    meta_file = Path(work) / META_FILE
    if not meta_file.is_file():
        return False
    old = json.loads(meta_file.read_text())

    def same(key: str) -> bool:                  # paths compare by the file they name
        if key in ("model", "data") and old.get(key) is not None:
            return Path(old[key]).resolve() == Path(run[key]).resolve()
        return old.get(key) == run[key]

    differs = {k: (old.get(k), run[k]) for k in run if not same(k)}
    if differs:
        raise ValueError(f"{work} holds features of another run {differs}; use a new work dir")
    return bool(old.get("complete")) and num_shards in (None, old.get("num_shards"))


def token_frequencies(work: str | Path, vocab_size: int) -> torch.Tensor:
    """Counts ``[V]`` of assistant tokens over every shard (memory-mapped: features are not read)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for path in shard_paths(work):
        shard = torch.load(path, mmap=True, weights_only=True)
        counts += torch.bincount(shard["input_ids"][shard["loss_mask"]].long(), minlength=vocab_size)
    return counts


def chunk_records(records: list[dict[str, Any]], shard_size: int) -> list[list[dict[str, Any]]]:
    """``records`` in consecutive shards of ``shard_size``."""
    return [records[s:s + shard_size] for s in range(0, len(records), shard_size)]


def feature_chunks(data: str | Path, limit: int | None, seed: int, shard_size: int) -> list[list[dict[str, Any]]]:
    """The records of each feature shard of ``data``: one shard per shard of a distillation folder, in
    order (the first ``limit`` records), else the shuffled JSONL records in shards of ``shard_size``."""
    if not is_distilled(data):
        return chunk_records(load_records(data, limit, seed), shard_size)
    chunks, left = [], limit or None
    for shard in distilled_shards(data):
        records = shard[:left]
        if left is not None:
            left -= len(records)
        if records:
            chunks.append(records)
    return chunks


def extract_features(model: Any, tokenizer: Any, chunks: list[list[dict[str, Any]]], work: str | Path,
                     run: dict[str, Any], max_len: int = 512, batch_tokens: int = 4096) -> dict[str, Any]:
    """Write every missing shard (``chunks[i]`` -> ``shard_{i}.pt``) under ``work``, then the token counts;
    returns the meta."""
    out = Path(work)
    out.mkdir(parents=True, exist_ok=True)
    features_complete(out, run)
    (out / META_FILE).write_text(json.dumps({**run, "complete": False}, indent=2))
    check_post_norm(model, tokenize_record(tokenizer, chunks[0][0], max_len)[0])
    todo = [i for i in range(len(chunks)) if not (out / f"shard_{i:05d}.pt").is_file()]
    with tqdm(total=sum(len(chunks[i]) for i in todo), desc="features", unit="rec") as bar:
        for i in todo:
            shard = extract_shard(model, tokenizer, chunks[i], max_len, batch_tokens, bar,
                                  tuple(run.get("aux_layers", ())))
            path = out / f"shard_{i:05d}.pt"
            torch.save(shard, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
    counts = token_frequencies(out, model.config.vocab_size)
    torch.save(counts, out / FREQ_FILE)
    meta = {**run, "complete": True, "num_records": sum(map(len, chunks)), "num_shards": len(chunks),
            "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
            "assistant_tokens": int(counts.sum())}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def run_key(model_dir: str | Path, data: str | Path, limit: int | None, max_len: int, seed: int,
            shard_size: int, aux_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """The settings that identify an extraction (a rerun must match them to resume or extend it). A
    distillation folder's features follow its shards (``seed`` and ``shard_size`` do not apply), so one
    that grew is extended, not re-extracted. ``aux_layers`` is named only when there are some."""
    aux = {"aux_layers": list(aux_layers)} if aux_layers else {}
    if is_distilled(data):
        return {"model": str(model_dir), "data": str(data), "limit": limit, "max_len": max_len,
                "layout": "one feature shard per distillation shard", **aux}
    return {"model": str(model_dir), "data": str(data), "limit": limit, "max_len": max_len, "seed": seed,
            "shard_size": shard_size, **aux}


def feature_parts(data: str | Path, work: str | Path) -> list[tuple[str | Path, Path]]:
    """(data, feature folder) of each part: ``<work>/<folder name>`` per folder when ``data`` joins several
    distillation folders, else ``data`` itself in ``work``."""
    folders = data_folders(data)
    if len(folders) < 2 or not is_distilled(data):
        return [(data, Path(work))]
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        raise ValueError(f"distillation folders sharing {work} need distinct names: {names}")
    return [(f, Path(work) / f.name) for f in folders]


def prepare_features(load_target: Callable[[], tuple[Any, Any]], model_dir: str | Path, data: str | Path,
                     work: str | Path, limit: int | None = None, max_len: int = 512, seed: int = 0,
                     shard_size: int = 250, batch_tokens: int = 4096,
                     aux_layers: tuple[int, ...] = ()) -> dict[str, Any]:
    """Extract every part of ``data`` that ``work`` lacks (``load_target() -> (model, tokenizer)`` is called
    only then) and return the meta of ``work``; ``limit`` applies to each part."""
    parts = feature_parts(data, work)
    target: tuple[Any, Any] | None = None
    metas = []
    for part, folder in parts:
        run = run_key(model_dir, part, limit, max_len, seed, shard_size, aux_layers)
        chunks = feature_chunks(part, limit, seed, shard_size)
        if features_complete(folder, run, len(chunks)):
            log.info("using the features in %s", folder)
        else:
            target = target or load_target()
            extract_features(*target, chunks, folder, run, max_len, batch_tokens)
        metas.append(json.loads((folder / META_FILE).read_text()))
    if len(parts) == 1:
        return metas[0]
    counts = sum(torch.load(folder / FREQ_FILE, weights_only=True) for _, folder in parts)
    torch.save(counts, Path(work) / FREQ_FILE)
    meta = {**run_key(model_dir, data, limit, max_len, seed, shard_size, aux_layers), "complete": True,
            "parts": [folder.name for _, folder in parts],
            **{k: sum(m[k] for m in metas) for k in ("num_records", "num_shards", "assistant_tokens")},
            "hidden_size": metas[0]["hidden_size"], "vocab_size": metas[0]["vocab_size"]}
    (Path(work) / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def run_features(model_dir: str | Path, data: str | Path, work: str | Path, limit: int | None = None,
                 max_len: int = 512, seed: int = 0, shard_size: int = 250, batch_tokens: int = 4096,
                 device: str = "cpu", aux_layers: tuple[int, ...] = ()) -> dict:
    """``prepare_features`` with the target loaded by transformers (fp32, on ``device``) from
    ``model_dir``."""

    def load_target() -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM

        from server.models.loader import load_tokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        return model, load_tokenizer(model_dir)

    return prepare_features(load_target, model_dir, data, work, limit, max_len, seed, shard_size,
                            batch_tokens, aux_layers)


def add_feature_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``python -m drafters.train.features`` and ``treespec train-drafter``."""
    parser.add_argument("--model", required=True, help="target model folder (Hugging Face safetensors)")
    parser.add_argument("--data", required=True,
                        help="JSONL with prompt/response records, or distillation folders (several joined by commas)")
    parser.add_argument("--work", required=True, help="folder for feature shards")
    parser.add_argument("--limit", type=int, default=None,
                        help="use the first N records (JSONL: after shuffling; distillation: in shard order)")
    parser.add_argument("--max-len", type=int, default=512, help="truncate sequences to N tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=250, help="records per shard")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per target forward")
    parser.add_argument("--device", default="cpu", help="torch device for the target and training (cpu, cuda)")
    parser.add_argument("--aux-layers", type=int, nargs="*", default=[],
                        help="also store these decoder layers' outputs (0-based; EAGLE-3 fuses e.g. 2 15 27 of 30) "
                             "and train EAGLE drafters that read them (train-drafter: default the --init's)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_feature_flags(parser)
    args = parser.parse_args(argv)
    meta = run_features(args.model, args.data, args.work, args.limit, args.max_len, args.seed,
                        args.shard_size, args.batch_tokens, args.device, tuple(args.aux_layers))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
