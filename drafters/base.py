"""The drafter protocol: one module per method, no method switches in the runner.

Per step the runner asks ``propose`` for one ``DraftTree`` per decoding request
(batched across requests), verifies all trees in one target forward, and reports
what was committed through ``on_accept`` (with the target's features of the
committed positions, which feature-based drafters such as EAGLE consume). A
drafter never touches the target's KV cache; it keeps its own state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from drafters.tree import DraftTree
from server.engine.request import SamplingParams


@dataclass
class DraftRequest:
    """What a drafter sees of one request this step."""

    request_id: str
    token_ids: list[int]          # committed tokens; the last one is the tree root (not yet in target KV)
    params: SamplingParams
    budget: int                   # most draft nodes the verifier accepts for this request this step


@dataclass
class AcceptUpdate:
    """Positions the target just committed for one request, with their features."""

    request_id: str
    start: int                    # position of the first fed token
    fed_tokens: list[int]         # tokens at positions start .. start + n - 1
    features: torch.Tensor        # [n, hidden] target post-norm hidden states at those positions
    next_token: int               # the token the target chose after them (the next root)
    reset: bool = False           # True on (re)prefill: drop any state held for this request


class Drafter(ABC):
    name: str = "base"
    max_tree_tokens: int = 0      # lookahead KV slots the scheduler reserves per request
    acceptance_profile: dict[int, float] | None = None  # measured tau per tree budget, for calibration

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """One tree per request, each with at most ``request.budget`` nodes."""

    def tree_shape(self) -> tuple[int, int] | None:
        """The server's (depth, top_k) for tree drafters: per-request overrides may not exceed them
        (a request cannot make everyone's step slower); ``None``: the drafter has no such knobs."""
        return None

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        """Learn what was committed (default: stateless drafter)."""

    def release(self, request_id: str) -> None:
        """Forget a finished or preempted request."""
