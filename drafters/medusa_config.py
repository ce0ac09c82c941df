"""Medusa's options (torch-free, so the server config can embed them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MedusaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tree: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: MEDUSA+ top-budget tuples of the "
                                               "heads' renormalised top-k marginals, per request and step; static: "
                                               "a fixed list of index paths (static_tree)")
    top_k: int = Field(10, ge=1, le=256, description="Candidates per head for the dynamic tree (MEDUSA+ K)")
    num_heads: int | None = Field(None, ge=1, description="Heads used, i.e. the deepest draft (default: all the "
                                                          "checkpoint's)")
    static_tree: str | None = Field(None, description="JSON file of the static tree's index paths (default: the "
                                                      "checkpoint's static_tree.json)")
