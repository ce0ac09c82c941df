"""Drafter training loop shared by every method (EAGLE ``eagle/train/main.py`` recipe).

Windows of stored target features (``features.py``) are cut from random records; a ``Recipe``
(one per method: ``eagle.py``, ``gumiho.py``) builds the drafter, computes its losses on a
batch and saves the checkpoint. The loop owns the optimiser (AdamW, warm-up then cosine),
gradient clipping, held-out evaluation, resumable state, progress bar, logs and the loss curve.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from drafters.eagle_model import EagleDrafter, own_state, read_checkpoint
from drafters.train.features import FREQ_FILE, split_shards, stored_aux_layers


@dataclass
class TrainConfig:
    """Hyperparameters and paths of one drafter training run."""

    work: str                       # feature shards (from ``features.py``)
    out: str                        # drafter checkpoint, train_log.json, loss_curve.png
    state: str | None = None        # resumable training state (default: ``out/train_state.pt``)
    lr: float = 3e-4
    batch_size: int = 8             # windows per step
    epochs: int = 20
    max_minutes: float | None = None
    warmup: int = 200
    max_len: int = 512              # window length (positions per window)
    head_vocab: int | None = None   # FR-Spec truncated head size K (None: full vocabulary)
    noise: float = 0.2
    v_weight: float = 1.0
    p_weight: float = 0.1
    grad_clip: float = 0.5
    val_shards: int = 1             # last shards held out (when there are more shards than this)
    save_every: int = 500
    log_every: int = 20
    seed: int = 0
    resume: bool = False
    init: str | None = None         # start from this drafter checkpoint's weights (and head) instead of random
    mlp_num: int = 5                # Gumiho: parallel MLP heads
    mlp_res_blocks: int = 5         # Gumiho: residual blocks per MLP head
    mlp_decay: float = 0.8          # Gumiho: MLP head i's loss weight is mlp_decay ** (i + 1) / 9
    mlp_ce_after_epochs: float = 2  # Gumiho: MLP heads' CE term starts after this many epochs
    unroll: int = 1                 # EAGLE: train on this many drafting steps (own features after the first)
    unroll_decay: float = 0.8       # EAGLE: step j's loss weight is unroll_decay ** j (EAGLE-3's TTT weights)
    layers: int | None = None       # EAGLE: decoder layers (None: the ``init``'s, else 1; fewer in ``init``: deepened)
    intermediate: int | None = None  # EAGLE: MLP width (None: the ``init``'s, else the target's; narrower: widened)
    aux_layers: tuple[int, ...] = ()  # EAGLE: target layers fused besides the last (the shards must hold them)
    device: str = "cpu"             # torch device for training (cuda: minutes instead of hours)
    amp: bool = False               # bf16 autocast (CUDA, or a CPU with bf16 products); weights, optimiser state and losses stay fp32


class ShardRecords:
    """Records of some feature shards, memory-mapped; ``window`` cuts a random span of one record."""

    def __init__(self, paths: list[Path]):
        self.shards = [torch.load(p, mmap=True, weights_only=True) for p in paths]
        self.index: list[tuple[int, int, int]] = []    # (shard, first token, end token) per record
        for s, shard in enumerate(self.shards):
            bounds = shard["offsets"].tolist()
            self.index += [(s, a, b) for a, b in itertools.pairwise(bounds) if b - a >= 2]

    def __len__(self) -> int:
        return len(self.index)

    def length(self, i: int) -> int:
        """Training positions of record ``i`` (tokens - 1)."""
        _, start, end = self.index[i]
        return end - start - 1

    def window(self, i: int, max_len: int, rng: random.Random) -> dict[str, torch.Tensor]:
        """Inputs/targets of up to ``max_len`` consecutive positions of record ``i``."""
        shard, start, end = self.index[i]
        first = start + rng.randrange(max(1, self.length(i) - max_len + 1))
        last = min(end, first + max_len + 1)
        sh = self.shards[shard]
        aux = {"aux": sh["aux"][first:last - 1].float()} if "aux" in sh else {}   # [T, k H]  a_t
        return {"tokens": sh["input_ids"][first + 1:last].long(),        # [T]  x_{t+1}
                "features": sh["features"][first:last - 1].float(),      # [T, H]  f_t
                "targets": sh["features"][first + 1:last].float(),       # [T, H]  f_{t+1}
                "mask": sh["loss_mask"][first + 1:last].float(),         # [T]
                "positions": torch.arange(first - start, last - start - 1), **aux}


def collate(windows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad windows to a batch (padding has mask 0; causal attention keeps it out of real rows)."""
    longest = max(len(w["tokens"]) for w in windows)
    return {k: torch.stack([F.pad(w[k], (0, 0, 0, longest - len(w[k])) if w[k].dim() == 2
                                  else (0, longest - len(w[k]))) for w in windows]) for k in windows[0]}


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(cfg: TrainConfig) -> torch.autocast:
    """bf16 autocast on the training device when ``cfg.amp`` (a no-op context otherwise)."""
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.amp)


def epoch_batches(data: ShardRecords, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of records of similar length (sorted within pools of 50 batches)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(data)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=data.length)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class Recipe(ABC):
    """How one drafter method is built, scored on a batch and saved (weights cast to ``save_dtype``)."""

    method: str = "base"

    def __init__(self, save_dtype: torch.dtype = torch.float32):
        self.save_dtype = save_dtype

    @abstractmethod
    def build(self, target_config: dict[str, Any], embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
              head_ids: torch.Tensor | None) -> EagleDrafter:
        """A freshly initialised drafter on the target's (frozen) embedding and LM head."""

    @abstractmethod
    def losses(self, drafter: EagleDrafter, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               noise: float, epoch: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Scalar ``loss`` (to minimise), ``acc`` (next-token top-1 agreement), ``tokens`` (positions
        scored) and any further metrics, plus the drafter's next-token argmax head ids ``[B, T]``.
        ``epoch``: the training epoch (for schedules; evaluation passes ``inf``)."""

    @abstractmethod
    def save(self, out: Path, drafter: EagleDrafter, extra: dict[str, Any]) -> None:
        """Write the checkpoint folder."""

    def read_init(self, folder: str) -> dict[str, torch.Tensor]:
        """The weights of a saved checkpoint of this method (``--init``), ``head_token_ids`` included when the
        checkpoint has a truncated head."""
        return read_checkpoint(folder)[1]

    def load_init(self, drafter: EagleDrafter, state: dict[str, torch.Tensor]) -> None:
        """Warm-start ``drafter`` from ``read_init``'s weights (without ``head_token_ids``)."""
        drafter.load_state_dict(own_state(state, drafter.config.num_hidden_layers))

    def top1_by_depth(self, drafter: EagleDrafter, batch: dict[str, torch.Tensor], full_head: torch.Tensor,
                      depth: int) -> list[tuple[float, float]]:
        """Per draft depth 1..``depth``: (hits, positions) of the drafter's argmax against the target's greedy
        token, drafting from every start of the batch on the drafter's own features (``unroll.py``)."""
        from drafters.train.unroll import unrolled, unrolled_losses

        preds = unrolled(drafter, batch["tokens"], batch["features"], batch["positions"], depth, batch.get("aux"))
        steps = unrolled_losses(drafter, preds, batch["targets"], batch["mask"], full_head)
        return [(float(t["acc_full"] * t["tokens"]), float(t["tokens"])) for t in steps]


def feature_losses(drafter: EagleDrafter, pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                   target_logits: torch.Tensor | None = None, with_ce: bool = True) -> dict[str, torch.Tensor]:
    """EAGLE's two terms for predicted features ``pred [B, T, H]`` against ``targets [B, T, H]`` over
    ``mask [B, T]``: SmoothL1 (``vloss``) and, ``with_ce``, CE against the target's head distribution
    (``ploss``), top-1 agreement over the head (``acc``) and the drafter's argmax head ids
    (``drafted [B, T]``). ``target_logits [B, T, K]`` may be passed when already computed."""
    denom = mask.sum() + 1e-5
    vloss = (F.smooth_l1_loss(pred, targets, reduction="none").mean(-1) * mask).sum() / denom
    if not with_ce:
        return {"vloss": vloss}
    if target_logits is None:
        with torch.no_grad():
            target_logits = drafter.logits(targets)                               # [B, T, K]
    logits = drafter.logits(pred)                                                 # [B, T, K]
    ploss = -((target_logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * mask).sum() / denom
    drafted = logits.detach().argmax(-1)                                          # [B, T]
    hits = (drafted == target_logits.argmax(-1)).float()
    return {"vloss": vloss, "ploss": ploss, "acc": (hits * mask).sum() / denom, "drafted": drafted,
            "target_logits": target_logits}


@torch.no_grad()
def evaluate(recipe: Recipe, drafter: EagleDrafter, data: ShardRecords, cfg: TrainConfig,
             full_head: torch.Tensor) -> dict[str, float]:
    """Held-out means of every metric the recipe reports, plus ``acc_full``: the drafter's argmax,
    mapped to target ids, equals the target's greedy token (over the full vocabulary)."""
    drafter.eval()
    totals: dict[str, float] = {"acc_full": 0.0}
    tokens = 0.0
    rng = random.Random(0)
    for ids in epoch_batches(data, cfg.batch_size, cfg.seed, epoch=-1):
        batch = to_device(collate([data.window(i, cfg.max_len, rng) for i in ids]), cfg.device)
        with autocast(cfg):
            out, drafted = recipe.losses(drafter, batch, cfg, 0.0, math.inf)
        greedy = F.linear(batch["targets"], full_head).argmax(-1)                  # [B, T]
        n = float(out.pop("tokens"))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * n
        hits = (drafter.to_target_ids(drafted) == greedy).float()
        totals["acc_full"] += float((hits * batch["mask"]).sum())
        tokens += n
    drafter.train()
    n = max(tokens, 1.0)
    return {k: v / n for k, v in totals.items()} | {"tokens": int(n)}


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% over ``progress`` (max of step and time fractions)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def head_token_ids(work: str | Path, k: int | None) -> torch.Tensor | None:
    """The ``k`` most frequent assistant tokens (ascending ids), or None for the full head."""
    counts = torch.load(Path(work) / FREQ_FILE, weights_only=True)
    if k is None or k >= len(counts):
        return None
    return counts.topk(k).indices.sort().values


def plot_curve(log: list[dict[str, float]], val: list[dict[str, float]], path: Path) -> None:
    """Training loss and top-1 agreement against step (held-out points as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in log]
    ax_loss.plot(steps, [r["loss"] for r in log], label="train")
    ax_acc.plot(steps, [r["acc"] for r in log], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="held-out")
        ax_acc.plot([r["step"] for r in val], [r["acc"] for r in val], "o-", label="held-out")
    for ax, name in ((ax_loss, "loss"), (ax_acc, "top-1 agreement")):
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_drafter(recipe: Recipe, cfg: TrainConfig, target_config: dict[str, Any], embed_weight: torch.Tensor,
                  lm_head_weight: torch.Tensor) -> dict[str, Any]:
    """Train (or resume) ``recipe``'s drafter for the target; writes the checkpoint and logs under ``cfg.out``."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = Path(cfg.state or out / "train_state.pt")
    stored = stored_aux_layers(cfg.work)
    if cfg.aux_layers and stored != tuple(cfg.aux_layers):
        raise ValueError(f"the drafter reads target layers {list(cfg.aux_layers)} but the features in {cfg.work} hold "
                         f"{stored}: extract them with --aux-layers into a new --work")
    train_paths, val_paths = split_shards(cfg.work, cfg.val_shards)
    train, val = ShardRecords(train_paths), ShardRecords(val_paths)
    state = (torch.load(state_path, weights_only=False, map_location=cfg.device)
             if cfg.resume and state_path.is_file() else None)
    ids = state["head_token_ids"] if state else head_token_ids(cfg.work, cfg.head_vocab)
    init = recipe.read_init(cfg.init) if cfg.init and not state else None
    if init is not None and "head_token_ids" in init:
        ids = init.pop("head_token_ids")
    embed_weight, lm_head_weight = embed_weight.float().to(cfg.device), lm_head_weight.float().to(cfg.device)
    drafter = recipe.build(target_config, embed_weight, lm_head_weight, ids).to(cfg.device)
    if init is not None:
        recipe.load_init(drafter, init)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    log: list[dict[str, float]] = []
    val_log: list[dict[str, float]] = []
    step, epoch, next_batch, elapsed = 0, 0, 0, 0.0
    if state:
        drafter.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, next_batch, elapsed = state["step"], state["epoch"], state["batch"], state["elapsed"]
        log, val_log = state["log"], state["val_log"]
    steps_per_epoch = len(epoch_batches(train, cfg.batch_size, cfg.seed, 0))
    total_steps = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    rng = random.Random(cfg.seed + step)
    began = time.time() - elapsed
    window: list[dict[str, float]] = []

    def checkpoint() -> dict[str, float]:
        metrics = {"step": step, **evaluate(recipe, drafter, val, cfg, lm_head_weight)} if len(val) else {}
        if metrics:
            val_log.append(metrics)
        extra = {"method": recipe.method, "step": step, "train": asdict(cfg), "held_out": metrics}
        recipe.save(out, drafter, extra)
        if (Path(cfg.work) / FREQ_FILE).is_file():            # for choosing a truncated head at load time
            shutil.copyfile(Path(cfg.work) / FREQ_FILE, out / FREQ_FILE)
        torch.save({"model": drafter.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "epoch": epoch, "batch": next_batch, "elapsed": time.time() - began, "log": log,
                    "val_log": val_log, "head_token_ids": drafter.head_token_ids}, state_path)
        return metrics

    drafter.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {recipe.method}", unit="step")
    stop = False
    while epoch < cfg.epochs and not stop:
        batches = epoch_batches(train, cfg.batch_size, cfg.seed, epoch)
        while next_batch < len(batches):
            if time.time() - began > budget:
                stop = True
                break
            progress = max(step / max(total_steps, 1), (time.time() - began) / budget)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, progress, cfg.warmup)
            batch = to_device(collate([train.window(i, cfg.max_len, rng) for i in batches[next_batch]]), cfg.device)
            with autocast(cfg):
                losses, _ = recipe.losses(drafter, batch, cfg, cfg.noise, epoch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step, next_batch = step + 1, next_batch + 1
            window.append({k: float(v.detach()) for k, v in losses.items() if k != "tokens"})
            bar.update(1)
            if step % cfg.log_every == 0:
                keys = dict.fromkeys(k for w in window for k in w)           # metrics may skip a batch
                row = {k: sum(w[k] for w in window if k in w) / sum(k in w for w in window) for k in keys}
                log.append({"step": step, **row, "lr": opt.param_groups[0]["lr"],
                            "time": time.time() - began})
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.3f}")
                window.clear()
            if step % cfg.save_every == 0:
                checkpoint()
        if not stop:
            epoch, next_batch = epoch + 1, 0
    bar.close()
    final = checkpoint()
    summary = {"steps": step, "epochs": round(epoch + next_batch / max(steps_per_epoch, 1), 3),
               "minutes": round((time.time() - began) / 60, 2), "train_records": len(train),
               "held_out_records": len(val), "head_vocab": len(drafter.head_weight),
               "final_train": log[-1] if log else {}, "held_out": final, "config": asdict(cfg)}
    (out / "train_log.json").write_text(json.dumps({**summary, "log": log, "val_log": val_log}, indent=2))
    plot_curve(log, val_log, out / "loss_curve.png")
    return summary
