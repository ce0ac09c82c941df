"""``treespec train-drafter``: extract target features (when missing), then train a drafter.

Methods plug in through ``TRAINERS``: a name mapped to ``"module:function"``, where the function
takes ``(args, target_config, embed_weight, lm_head_weight)`` and returns a JSON-able summary.
Every method reads the same feature shards (``drafters/train/features.py``) from ``--work``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from drafters.train.features import add_feature_flags, run_features

log = logging.getLogger(__name__)

TRAINERS: dict[str, str] = {
    "eagle": "drafters.train.cli:train_eagle_from_args",
    "gumiho": "drafters.train.cli:train_gumiho_from_args",
    "medusa": "drafters.train.medusa:train_medusa_from_args",
    "draft-model": "drafters.train.cli:train_draft_model_from_args",
}
TOKEN_METHODS = {"draft-model"}   # trained on token ids alone: no feature extraction (``--work`` is unused)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Feature-extraction flags plus the training flags shared by every method."""
    parser.add_argument("--method", choices=sorted(TRAINERS), default="eagle", help="drafter to train")
    add_feature_flags(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--out", required=True, help="output folder for the drafter checkpoint and logs")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--max-minutes", type=float, default=None, help="stop training after this many minutes")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--batch-size", type=int, default=8, help="windows per optimiser step")
    g.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    g.add_argument("--head-vocab", type=int, default=None,
                   help="train a truncated LM head over the K most frequent assistant tokens (FR-Spec)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--val-shards", type=int, default=1, help="feature shards held out for evaluation")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast, on CUDA or a CPU with native bf16 products (avx512_bf16, AMX: EAGLE "
                        "steps 1.47x faster on this project's CPU); weights, optimiser state and losses stay fp32")
    g.add_argument("--eagle-layers", type=int, default=None,
                   help="EAGLE: decoder layers (default: the --init's, else 1); an --init with fewer is deepened "
                        "(new layers start as no-ops)")
    g.add_argument("--eagle-intermediate", type=int, default=None,
                   help="EAGLE: MLP width (default: the --init's, else the target's); an --init with a narrower MLP "
                        "is widened (new units start as no-ops)")
    g.add_argument("--unroll", type=int, default=1,
                   help="EAGLE: train on N drafting steps, each after the first reading the drafter's own "
                        "features (EAGLE-3's training-time test); 1 = EAGLE-1/2 training")
    g.add_argument("--resume", action="store_true", help="continue from the saved training state")
    g.add_argument("--init", default=None, help="start from this drafter checkpoint folder (warm start)")
    g.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the saved checkpoint weights (every method)")
    g.add_argument("--state", default=None, help="training state file (default: <work>/<method>_train_state.pt)")
    g = parser.add_argument_group("gumiho")
    g.add_argument("--mlp-num", type=int, default=5, help="parallel MLP heads")
    g.add_argument("--mlp-res-blocks", type=int, default=5, help="residual blocks per MLP head")
    g = parser.add_argument_group("draft-model")
    g.add_argument("--draft-init", choices=["prefix", "fresh"], default="prefix",
                   help="the target's first --draft-layers layers (fine-tuned) or fresh ones")
    g.add_argument("--draft-layers", type=int, default=2, help="decoder layers of the draft model")
    g = parser.add_argument_group("medusa")
    g.add_argument("--medusa-heads", type=int, default=4, help="heads (head i drafts the token i + 1 after the root)")
    g.add_argument("--medusa-layers", type=int, default=1, help="residual blocks per head")
    g.add_argument("--medusa-head", choices=["frozen", "trained"], default="frozen",
                   help="vocabulary head: the target's LM head, frozen and not saved, or a trained Linear per head "
                        "(over the --head-vocab most frequent tokens when given)")
    g.add_argument("--medusa-decay", type=float, default=0.8, help="head i's loss weight is decay ** i")


def target_head(model_dir: str | Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The target's HF config, token embedding ``[V, H]`` and LM head ``[V, H]`` (tied when absent)."""
    from server.models.loader import load_weights

    config, state = load_weights(model_dir)
    embed = state["model.embed_tokens.weight"]
    return config, embed, state.get("lm_head.weight", embed)


def train_config(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of the command-line settings."""
    from drafters.train.loop import TrainConfig

    state = args.state
    if state is None:
        legacy = Path(args.work) / "train_state.pt"            # runs before the per-method file name
        state = str(legacy if args.method == "eagle" and legacy.is_file()
                    else Path(args.work) / f"{args.method}_train_state.pt")
    return TrainConfig(work=args.work, out=args.out, state=state, lr=args.lr, batch_size=args.batch_size,
                       epochs=args.epochs, max_minutes=args.max_minutes, warmup=args.warmup, max_len=args.max_len,
                       head_vocab=args.head_vocab, val_shards=args.val_shards, save_every=args.save_every,
                       seed=args.seed, resume=args.resume, mlp_num=args.mlp_num,
                       mlp_res_blocks=args.mlp_res_blocks, device=args.device, amp=args.amp,
                       unroll=args.unroll, init=args.init, layers=args.eagle_layers,
                       intermediate=args.eagle_intermediate, aux_layers=tuple(args.aux_layers))


def train_eagle_from_args(args: argparse.Namespace, target_config: dict[str, Any], embed: torch.Tensor,
                          lm_head: torch.Tensor) -> dict[str, Any]:
    """Run ``drafters.train.eagle.train_eagle`` with the command-line settings."""
    from drafters.train.eagle import train_eagle

    return train_eagle(train_config(args), target_config, embed, lm_head, getattr(torch, args.save_dtype))


def train_gumiho_from_args(args: argparse.Namespace, target_config: dict[str, Any], embed: torch.Tensor,
                           lm_head: torch.Tensor) -> dict[str, Any]:
    """Run ``drafters.train.gumiho.train_gumiho`` with the command-line settings."""
    from drafters.train.gumiho import train_gumiho

    return train_gumiho(train_config(args), target_config, embed, lm_head, getattr(torch, args.save_dtype))


def train_draft_model_from_args(args: argparse.Namespace, target_config: dict[str, Any], embed: torch.Tensor,
                                lm_head: torch.Tensor) -> dict[str, Any]:
    """Run ``drafters.train.draft_model.train_draft_model`` (``--data``: a self-distillation folder)."""
    from drafters.train.draft_model import train_draft_model
    from server.models.loader import load_weights

    _, state = load_weights(args.model)
    return train_draft_model(args.data, args.out, target_config, state, init=args.init or args.draft_init,
                             layers=args.draft_layers, lr=args.lr, batch_tokens=args.batch_tokens,
                             max_len=args.max_len, max_minutes=args.max_minutes or math.inf, epochs=args.epochs,
                             warmup=args.warmup, val_shards=args.val_shards, seed=args.seed,
                             save_dtype=getattr(torch, args.save_dtype))


def _trainer(method: str):
    module, _, name = TRAINERS[method].partition(":")
    return getattr(importlib.import_module(module), name)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Features (unless ``--work`` already holds a complete set), then the chosen method's training."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method in TOKEN_METHODS:
        log.info("%s trains on token ids: no feature extraction", args.method)
    else:                                       # extracts only what --work lacks
        if args.method == "eagle":
            from drafters.train.eagle import drafter_aux_layers

            args.aux_layers = list(drafter_aux_layers(tuple(args.aux_layers), args.init))
        run_features(args.model, args.data, args.work, args.limit, args.max_len, args.seed,
                     args.shard_size, args.batch_tokens, args.device, tuple(args.aux_layers))
    target_config, embed, lm_head = target_head(args.model)
    summary = _trainer(args.method)(args, target_config, embed, lm_head)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary
