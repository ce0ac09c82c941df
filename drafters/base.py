"""The drafter protocol: one module per method, no method switches in the runner.

Per step the runner asks ``propose`` for one ``DraftTree`` per decoding request
(batched across requests), verifies all trees in one target forward, and reports
what was committed through ``on_accept`` (with the target's features of the
committed positions, which feature-based drafters such as EAGLE consume). A
drafter never touches the target's KV cache; it keeps its own state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
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
    num_prompt_tokens: int = 0    # the first ``num_prompt_tokens`` of ``token_ids`` are the prompt


@dataclass
class AcceptUpdate:
    """Positions the target just committed for one request, with their features."""

    request_id: str
    start: int                    # position of the first fed token
    fed_tokens: list[int]         # tokens at positions start .. start + n - 1
    features: torch.Tensor        # [n, hidden] target post-norm hidden states at those positions, followed by the
                                  # outputs of the drafter's ``aux_layers`` ([n, (1 + k) hidden]) when it has any
    next_token: int               # the token the target chose after them (the next root)
    reset: bool = False           # True on (re)prefill: drop any state held for this request


@dataclass
class TargetAccess:
    """The narrow view of the runner a self-speculative drafter (SWIFT) gets through ``Drafter.bind``.

    ``forward(ids, positions, seqs, skip_attn, skip_mlp) -> hidden [T, H]`` runs the target eagerly with
    those sub-layers skipped; its KV writes land where ``seqs`` put the new tokens, which a drafter may
    only point at its requests' lookahead slots (positions >= the committed length, rewritten by the
    verify pass) or at blocks from ``scratch(n)`` (a context manager lending ``n`` free KV blocks, or
    ``None`` when the pool has none to spare). ``block_table(request_id)`` is the request's table.
    """

    model: torch.nn.Module
    forward: Callable[..., torch.Tensor]
    block_table: Callable[[str], list[int]]
    scratch: Callable[[int], AbstractContextManager[list[int] | None]]
    block_size: int
    device: torch.device


class Drafter(ABC):
    name: str = "base"
    max_tree_tokens: int = 0      # lookahead KV slots the scheduler reserves per request
    acceptance_profile: dict[int, float] | None = None  # measured tau per tree budget, for calibration
    calibratable: bool = True     # start-up calibration can time ``propose`` on synthetic requests
    aux_layers: tuple[int, ...] = ()  # target decoder layers (0-based) whose outputs the features carry too

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """One tree per request, each with at most ``request.budget`` nodes."""

    def tree_shape(self) -> tuple[int, int] | None:
        """The server's (depth, top_k) for tree drafters: per-request overrides may not exceed them
        (a request cannot make everyone's step slower); ``None``: the drafter has no such knobs."""
        return None

    def bench_report(self) -> dict | None:
        """Drafter-specific figures for the benchmark report (default: none)."""
        return None

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Called once by the runner when the target runs from CUDA graphs (default: the drafter stays eager)."""

    def bind(self, target: TargetAccess) -> None:
        """Called once by the runner; only self-speculative drafters use the target (default: ignore)."""

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        """Learn what was committed (default: stateless drafter)."""

    def release(self, request_id: str) -> None:
        """Forget a finished or preempted request."""
