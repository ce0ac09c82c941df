"""Drafter names -> factories; the engine builder looks methods up here (no method switches elsewhere)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from drafters.base import Drafter

Factory = Callable[..., Drafter | None]


def _lookup(cfg, target) -> Drafter:
    from drafters.lookup import LookupDrafter

    return LookupDrafter(max_tree_tokens=cfg.max_draft_tokens)


SHIPPED = {"SmolLM2-135M-Instruct": Path(__file__).resolve().parent / "checkpoints" / "smollm2-eagle"}


def shipped_drafter(model: str) -> Path | None:
    """The drafter shipped for a model given as ``default`` or a path to the embedded model's folder."""
    return SHIPPED["SmolLM2-135M-Instruct"] if model == "default" else SHIPPED.get(Path(model).name)


def _eagle(cfg, target) -> Drafter:
    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import load_checkpoint

    path = cfg.drafter_path or shipped_drafter(cfg.model)
    if path is None:
        raise ValueError("--drafter eagle needs --drafter-path (an EAGLE checkpoint folder) for this model")
    net = load_checkpoint(path, target.embed_tokens, target.lm_head, cfg.draft_head_vocab)
    drafter = EagleTreeDrafter(net, cfg.max_draft_tokens, cfg.draft_depth, cfg.draft_top_k)
    drafter.acceptance_profile = load_acceptance_profile(Path(path))
    return drafter


def load_acceptance_profile(folder: Path) -> dict[int, float] | None:
    """``acceptance.json`` beside a checkpoint: ``{"tau_by_budget": {"8": 2.1, ...}}`` measured by bench."""
    f = folder / "acceptance.json"
    if not f.is_file():
        return None
    return {int(k): float(v) for k, v in json.loads(f.read_text())["tau_by_budget"].items()}


DRAFTERS: dict[str, Factory] = {
    "none": lambda cfg, target: None,
    "lookup": _lookup,
    "eagle": _eagle,
}


def build_drafter(name: str, cfg, target) -> Drafter | None:
    """``cfg`` is the ServerConfig, ``target`` the loaded target model."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; available: {sorted(DRAFTERS)}")
    return DRAFTERS[name](cfg, target)
