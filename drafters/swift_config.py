"""SWIFT's options (torch-free, so the server config can embed them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from drafters.swift_search import SearchConfig


class SwiftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stop_threshold: float = Field(0.8, gt=0, le=1, description="Stop a chain once its top-1 probability is lower")
    max_draft_steps: int = Field(25, ge=1, description="Longest draft chain")
    confidence_levels: tuple[float, ...] = Field((0.95, 0.8, 0.5), description="Top-1 probability thresholds, "
                                                 "high to low, that set the candidates per depth")
    greedy_candidates: tuple[int, ...] = Field((3, 5, 8, 10), description="Candidates (chain + siblings) per "
                                               "depth above each confidence level and below the last (greedy)")
    sampling_candidates: tuple[int, ...] = Field((1, 3, 5, 10), description="The same for sampled requests")
    optimise: bool = Field(True, description="Search for better skip sets while serving (off: keep the loaded "
                                             "or initial set)")
    skip_sets: str | None = Field(None, description="JSON file of skip sets per task key: loaded at start-up "
                                                    "if present, written whenever a task's search finishes")
    max_tasks: int = Field(64, ge=1, description="Most task keys with their own search (requests naming more "
                                                 "draft with the default task's set)")
    search: SearchConfig = Field(default_factory=SearchConfig)
