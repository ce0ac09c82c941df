"""Request state and sampling parameters (torch-free)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding controls; ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 = disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    draft_tokens: int | None = None    # per-request draft-tree budget (None: server default; 0: no drafting)
    draft_depth: int | None = None     # per-request tree depth / top-k for tree drafters (None: server default)
    draft_top_k: int | None = None
    task: str | None = None            # SWIFT: the task key whose skip set drafts (None: the server's default)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    """Per-request speculation counters (zero for plain decoding)."""

    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """tau: mean over verify steps of (accepted drafts + 1)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0                         # positions whose KV is committed
    max_computed_tokens: int = 0                         # most ever committed (recompute below it is not new)
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0                           # prompt tokens whose KV came from the prefix cache
    spec: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token: int) -> str | None:
        """Append one generated token; returns a finish reason if it ends the request."""
        self.token_ids.append(token)
        p = self.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if self.num_output_tokens >= p.max_tokens:
            return "length"
        return None
