"""Drafter names -> factories; the engine builder looks methods up here (no method switches elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from drafters.base import Drafter

Factory = Callable[..., Drafter | None]


def _lookup(cfg, target) -> Drafter:
    from drafters.lookup import LookupDrafter

    return LookupDrafter(max_tree_tokens=cfg.max_draft_tokens)


SHIPPED = {"default": Path(__file__).resolve().parent / "checkpoints" / "smollm2-eagle"}


def _eagle(cfg, target) -> Drafter:
    from drafters.eagle import EagleTreeDrafter
    from drafters.eagle_model import load_checkpoint

    path = cfg.drafter_path or SHIPPED.get(cfg.model)
    if path is None:
        raise ValueError("--drafter eagle needs --drafter-path (an EAGLE checkpoint folder) for this model")
    net = load_checkpoint(path, target.embed_tokens, target.lm_head)
    return EagleTreeDrafter(net, cfg.max_draft_tokens, cfg.draft_depth, cfg.draft_top_k)


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
