"""Draft-model training (``treespec train-drafter --method draft-model``): a small Llama on the target's tokens.

It needs token ids only, no target features (so the feature-extraction stage is skipped): the records
are a self-distillation folder (``--data``, ``drafters/train/distill.py``), the target's own answers, and
the loss is next-token cross-entropy on answer tokens (prompt tokens are context only). Two candidates
(``--draft-init``), both ``--draft-layers`` N layers at the target's width:

- ``prefix``: the target's first N decoder layers and its final norm, fine-tuned;
- ``fresh``: N freshly initialised layers and a fresh final norm;

(``--init FOLDER`` continues from a saved draft model instead).

Both read the target's token embedding and LM head, frozen, and the checkpoint does not store them
(``drafters/draft_model.py`` loads such a checkpoint onto the target's). The model runs through the
same ``LlamaModel.forward`` as at inference, over a scratch paged cache (one block per record) that
autograd differentiates through.

Held out: the last ``--val-shards`` shard(s). Reported: ``top1`` (teacher-forced next-token agreement with
the answer) and ``chain`` by depth d: the share of answer positions from which the model's own greedy
d-token continuation equals the answer's next d tokens (its inputs equal the answer's while all earlier
drafts were right, so this follows from the teacher-forced hits), and the measured cost of one draft
forward (``forward_ms``: 1 and 8 new tokens over a 256-token context, inference mode, this process's threads).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from drafters.train.distill import distill_shards
from drafters.train.features import data_folders, hold_out_last, length_batches, shard_records
from kernels import SeqAttention, get_backend
from server.models.llama import LlamaConfig, LlamaModel

SHARED = ("embed_tokens.weight", "lm_head.weight")   # the target's, frozen, never saved
CHAIN_DEPTHS = 6


def draft_hf_config(target_config: dict[str, Any], layers: int) -> dict[str, Any]:
    """The target's HF config with ``layers`` decoder layers (what the checkpoint's ``config.json`` holds)."""
    return {**target_config, "num_hidden_layers": layers}


def build_candidate(init: str, layers: int, target_config: dict[str, Any], target_state: dict[str, torch.Tensor],
                    seed: int = 0) -> LlamaModel:
    """A draft ``LlamaModel`` (fp32, CPU) on the target's embedding and LM head; see the module docstring."""
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig.from_hf(draft_hf_config(target_config, layers)))
    if init == "prefix":
        model.load_hf_state_dict(target_state)                     # layers 0 .. N-1, final norm, embedding, head
    elif init == "fresh":
        model.load_hf_state_dict({**target_state, **fresh_layers(model)})
    elif Path(init).is_dir():                                       # a saved draft model: continue from it
        own = load_file(str(Path(init) / "model.safetensors"))
        model.load_hf_state_dict({**target_state, **{k: v.float() for k, v in own.items()}})
    else:
        raise ValueError(f"unknown draft-model init {init!r} (prefix, fresh or a draft-model checkpoint folder)")
    for name, p in model.named_parameters():
        p.requires_grad_(name not in SHARED)
    return model


def fresh_layers(model: LlamaModel) -> dict[str, torch.Tensor]:
    """HF-named random weights for ``model``'s layers (normal, std 0.02; output projections scaled by depth)
    and unit norms."""
    cfg, out = model.config, {}
    std = 0.02
    for name, shape in hf_layer_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        else:
            scale = 1 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
            out[name] = torch.randn(shape) * std * scale
    return out


def hf_layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.norm.weight": (h,)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def hf_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The draft model's own weights under Hugging Face names (q/k/v and gate/up split; no embedding or head)."""
    cfg, sd = model.config, model.state_dict()
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"model.norm.weight": sd["norm.weight"]}
    for n in range(cfg.num_hidden_layers):
        p, hf = f"layers.{n}.", f"model.layers.{n}."
        for name, w in zip("qkv", sd[p + "self_attn.qkv_proj.weight"].split([q, kv, kv])):
            out[hf + f"self_attn.{name}_proj.weight"] = w
        gate, up = sd[p + "mlp.gate_up_proj.weight"].chunk(2)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                     "post_attention_layernorm.weight"):
            out[hf + name] = sd[p + name]
    return out


def save_draft_model(out: str | Path, model: LlamaModel, target_config: dict[str, Any], extra: dict[str, Any],
                     dtype: torch.dtype = torch.float16) -> Path:
    """``config.json`` (HF Llama of the draft's depth, ``"treespec"`` extras) and ``model.safetensors`` without
    the embedding and LM head, which the loader takes from the target."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_state(model).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = draft_hf_config(target_config, model.config.num_hidden_layers)
    (folder / "config.json").write_text(json.dumps({**cfg, "treespec": {"shares_target": list(SHARED), **extra}},
                                                   indent=2))
    return folder


def causal_hidden(model: LlamaModel, batch: list[list[int]]) -> torch.Tensor:
    """Post-norm hidden states of each record (causal, from position 0), concatenated: ``[sum n_i, H]``.

    Runs ``model.forward`` over a fresh scratch paged cache (block ``b`` = record ``b``) with the reference
    backend, which is differentiable."""
    cfg, longest = model.config, max(len(ids) for ids in batch)
    backend = get_backend(longest, "cpu", "reference")
    dtype = next(model.parameters()).dtype
    shape = (len(batch), longest, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers]
    meta = backend.build_metadata([SeqAttention([b], 0, len(ids)) for b, ids in enumerate(batch)])
    ids = torch.tensor([t for r in batch for t in r])
    positions = torch.cat([torch.arange(len(r)) for r in batch])
    return model(ids, positions, caches, meta, backend)                               # [N, H]


def scored(batch: list[dict[str, Any]], max_len: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Truncated records, the flat positions whose next token is an answer token ``[M]`` and those tokens ``[M]``."""
    seqs, rows, targets, offset = [], [], [], 0
    for r in batch:
        ids = r["input_ids"][:max_len]
        seqs.append(ids)
        first = max(r["prompt_len"], 1)
        rows.extend(range(offset + first - 1, offset + len(ids) - 1))
        targets.extend(ids[first:])
        offset += len(ids)
    return seqs, torch.tensor(rows, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def batch_loss(model: LlamaModel, batch: list[dict[str, Any]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over the batch's answer tokens and the per-token hits ``[M]`` (bool) of the model's argmax."""
    seqs, rows, targets = scored(batch, max_len)
    logits = model.compute_logits(causal_hidden(model, seqs)[rows]).float()          # [M, V]
    return F.cross_entropy(logits, targets), logits.detach().argmax(-1) == targets


def chain_rates(hits: list[torch.Tensor], depths: int = CHAIN_DEPTHS) -> list[float]:
    """Share of answer positions whose next ``d`` tokens are all hits, d = 1 .. ``depths`` (per record ``[m]``)."""
    rates = []
    for d in range(1, depths + 1):
        ok = total = 0
        for h in hits:
            if len(h) >= d:
                run = h.unfold(0, d, 1).all(-1)                                        # [m - d + 1]
                ok, total = ok + int(run.sum()), total + len(h)
            else:
                total += len(h)
        rates.append(ok / max(total, 1))
    return rates


@torch.no_grad()
def evaluate(model: LlamaModel, records: list[dict[str, Any]], max_len: int, batch_tokens: int) -> dict[str, Any]:
    """Held-out loss, top-1 and chain acceptance by depth (see the module docstring)."""
    model.eval()
    loss = tokens = 0.0
    hits: list[torch.Tensor] = []
    for group in length_batches([min(len(r["input_ids"]), max_len) for r in records], batch_tokens):
        batch = [records[i] for i in group]
        ce, h = batch_loss(model, batch, max_len)
        loss, tokens = loss + float(ce) * len(h), tokens + len(h)
        sizes = [max(0, min(len(r["input_ids"]), max_len) - max(r["prompt_len"], 1)) for r in batch]
        hits.extend(h.split(sizes))
    model.train()
    chain = chain_rates(hits)
    return {"loss": loss / max(tokens, 1), "top1": sum(int(h.sum()) for h in hits) / max(tokens, 1),
            "chain": [round(c, 4) for c in chain], "expected_run": round(1 + sum(chain), 3), "tokens": int(tokens)}


@torch.inference_mode()
def forward_ms(model: LlamaModel, context: int = 256, new: tuple[int, ...] = (1, 8), repeats: int = 20) -> dict:
    """Milliseconds of one draft forward (``new`` tokens after ``context`` cached ones, with the LM head)."""
    cfg = model.config
    block = 16
    blocks = -(-(context + max(new)) // block)
    backend = get_backend(block, "cpu", "reference")
    shape = (blocks, block, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    out = {}
    for n in new:
        meta = backend.build_metadata([SeqAttention(list(range(blocks)), context, n)])
        ids, pos = torch.zeros(n, dtype=torch.long), torch.arange(context, context + n)
        times = []
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            model.compute_logits(model(ids, pos, caches, meta, backend))
            times.append(time.perf_counter() - t0)
        out[str(n)] = round(1000 * sorted(times[2:])[len(times[2:]) // 2], 3)
    return out


def split_records(data: str | Path, val_shards: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out records: the last ``val_shards`` shards of each distillation folder (one, or
    several comma-joined) are held out."""
    folders = data_folders(data)
    groups = [distill_shards(folder) for folder in folders]
    for folder, shards in zip(folders, groups):
        if len(shards) <= val_shards:
            raise ValueError(f"{folder}: {len(shards)} shard(s), cannot hold out {val_shards}")
    train, held = hold_out_last(groups, val_shards)
    return [r for path in train for r in shard_records(path)], [r for path in held for r in shard_records(path)]


def train_draft_model(data: str | Path, out: str | Path, target_config: dict[str, Any],
                      target_state: dict[str, torch.Tensor], *, init: str = "prefix", layers: int = 2,
                      lr: float = 3e-4, batch_tokens: int = 2048, max_len: int = 512, max_minutes: float = 15.0,
                      epochs: int = 4, warmup: int = 20, val_shards: int = 1, seed: int = 0,
                      save_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Train one candidate for ``max_minutes`` (or ``epochs``); writes the checkpoint and ``train_log.json``."""
    train, val = split_records(data, val_shards)
    model = build_candidate(init, layers, target_config, target_state, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    groups = length_batches([min(len(r["input_ids"]), max_len) for r in train], batch_tokens)
    before = evaluate(model, val, max_len, batch_tokens)
    log, step, began, budget = [], 0, time.time(), max_minutes * 60
    total = epochs * len(groups)
    model.train()
    for _ in range(epochs):
        rng.shuffle(groups)
        for group in groups:
            elapsed = time.time() - began
            if elapsed > budget:
                break
            progress = max(step / total, elapsed / budget)
            factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
            for g in opt.param_groups:
                g["lr"] = lr * factor
            ce, hits = batch_loss(model, [train[i] for i in group], max_len)
            opt.zero_grad(set_to_none=True)
            ce.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            log.append({"step": step, "loss": round(float(ce.detach()), 4), "acc": round(float(hits.float().mean()), 4),
                        "time": round(time.time() - began, 1)})
    after = evaluate(model, val, max_len, batch_tokens)
    summary = {"init": init, "layers": layers, "steps": step, "minutes": round((time.time() - began) / 60, 2),
               "train_records": len(train), "held_out_records": len(val), "held_out_before": before,
               "held_out": after, "forward_ms": forward_ms(model), "threads": torch.get_num_threads()}
    save_draft_model(out, model, target_config, {"method": "draft-model", **summary}, save_dtype)
    (Path(out) / "train_log.json").write_text(json.dumps({**summary, "log": log}, indent=2))
    return summary
