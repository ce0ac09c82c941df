"""GSD's options (torch-free, so the server config can embed them).

Defaults follow the hyper-parameter grid of the GSD reference script (gzhch/gsd ``gsd.py``, docs/ALGORITHMS.md
§6): ``tree_decoding`` n = 4, ``prob_threshold`` in {0.3, 0.4}, ``sibling_threshold`` in {0.1 .. 0.4},
``repeat_threshold`` in {0, 1, -1}. The released script sets no draft length or node cap; ``max_steps`` and
``max_nodes`` are this project's, sized for the CPU verify budgets (DESIGN.md: trees of ~16-32 tokens verify
cheaply; EAGLE's default depth is 5).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GsdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_n: int = Field(4, ge=1, le=64, description="Candidates per drafted node (the draft model's top-n; "
                                                   "GSD grid: 4)")
    sibling_threshold: float = Field(0.3, ge=0, le=1, description="Keep a candidate only if its probability is "
                                                                  "at least this fraction of its best sibling's "
                                                                  "(GSD grid: 0.1-0.4)")
    prob_threshold: float = Field(0.3, ge=0, le=1, description="A candidate below this probability is a leaf, "
                                                               "and so are its descendants; drafting stops once "
                                                               "a step adds only leaves (GSD grid: 0.3, 0.4)")
    repeat_threshold: int = Field(0, ge=-1, le=16, description="DAG merging: -1 off; 0 merge a candidate into an "
                                                               "existing node of the same token; r also require "
                                                               "the r preceding tokens to match (GSD grid: 0, 1, -1)")
    max_steps: int = Field(6, ge=1, le=32, description="Most draft steps (tree depth) per verify step")
    max_nodes: int = Field(32, ge=1, le=1024, description="Most graph nodes drafted (fed to the draft model) "
                                                          "per request per verify step")
