"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    text: str                      # new text since the last output
    token_ids: list[int]           # new tokens since the last output
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    num_cached_tokens: int = 0     # prompt tokens served from the prefix cache
    error: str | None = None

    @property
    def mean_acceptance_length(self) -> float:
        steps = self.verify_steps
        return (self.accepted_tokens + steps) / steps if steps else 0.0


@dataclass
class RunnerOutput:
    """What the model runner hands the engine after one step."""

    new_tokens: dict[str, list[int]] = field(default_factory=dict)  # accepted drafts + bonus, per request
    drafted: dict[str, int] = field(default_factory=dict)           # tree size, decoding requests only
    accepted: dict[str, int] = field(default_factory=dict)          # accepted draft tokens
    timings: dict[str, float] = field(default_factory=dict)         # seconds: draft, forward, accept

    def merge(self, other: RunnerOutput) -> None:
        """Add another (partial) step's results: per-request maps joined, timings summed."""
        self.new_tokens.update(other.new_tokens)
        self.drafted.update(other.drafted)
        self.accepted.update(other.accepted)
        for k, v in other.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


@dataclass
class StepStats:
    """One engine step, for the metrics exporter."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_prompt_tokens: int
    num_generation_tokens: int
    step_time: float
    ttft: list[float] = field(default_factory=list)          # seconds, requests that got a first token
    inter_token: list[float] = field(default_factory=list)   # seconds per token, later tokens
    e2e: list[float] = field(default_factory=list)           # seconds, requests that finished
    finished_reasons: list[str] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)     # tree size of each verify step this engine step
    accepted: list[int] = field(default_factory=list)    # accepted draft tokens of each verify step
    timings: dict[str, float] = field(default_factory=dict)  # runner phases (draft, forward, accept), seconds
    spec_budget: int | None = None   # draft budget per decoding request this step (None: nothing decoded)
    num_preemptions: int = 0         # requests preempted (KV dropped, to be recomputed) this step
    num_recomputed_tokens: int = 0   # prefill tokens computed again after a preemption (not in prompt tokens)
    prefix_query_tokens: int = 0     # tokens of requests admitted this step (prefix-cache lookups)
    prefix_hit_tokens: int = 0       # of which the prefix cache held the KV
