"""Draft-model drafter options (torch-free, so the server config can embed them as ``draft_model``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DraftModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: int | None = Field(None, ge=1, le=32, description="Draft-model forwards per step after the root's "
                                                             "(max draft length - 1; default: draft_depth, else 5)")
    top_k: int | None = Field(None, ge=1, le=64, description="Children per expanded node and frontier width "
                                                             "(default: draft_top_k)")
    kv_tokens: int | None = Field(None, ge=1, description="Draft KV cache size in tokens (default: the target's "
                                                          "KV capacity plus every running request's scratch)")
    chunk: int = Field(128, ge=1, description="Most context tokens of one request the draft model absorbs per "
                                              "forward (long prompts are absorbed chunk by chunk as they prefill)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Draft weights and KV dtype (auto: the target's)")
