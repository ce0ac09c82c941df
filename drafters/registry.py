"""Drafter names -> factories; the engine builder looks methods up here (no method switches elsewhere)."""

from __future__ import annotations

from collections.abc import Callable

from drafters.base import Drafter

Factory = Callable[..., Drafter | None]


def _lookup(cfg, target) -> Drafter:
    from drafters.lookup import LookupDrafter

    return LookupDrafter(max_tree_tokens=cfg.max_draft_tokens)


DRAFTERS: dict[str, Factory] = {
    "none": lambda cfg, target: None,
    "lookup": _lookup,
}


def build_drafter(name: str, cfg, target) -> Drafter | None:
    """``cfg`` is the ServerConfig, ``target`` the loaded target model."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; available: {sorted(DRAFTERS)}")
    return DRAFTERS[name](cfg, target)
