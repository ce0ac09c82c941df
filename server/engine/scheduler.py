"""Continuous-batching scheduler (torch-free): admission, lookahead slots, preemption by recompute.

The draft budget of a step follows the load: the number of running (decoding) requests at the
start of the step picks it from the ``BudgetPolicy``, and every decoding request of that step
gets it (unless its own ``draft_tokens`` says otherwise), capped by its remaining tokens and the
context window. Its lookahead KV slots are reserved to match.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.cache.kv_manager import KVManager
from server.engine.budget import BudgetLog, BudgetPolicy
from server.engine.request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    num_lookahead_slots: int = 0  # most KV slots reserved per running request for draft-tree tokens
    max_model_len: int = 1 << 30  # lookahead never reaches past the context window
    budget_policy: BudgetPolicy | None = None  # budget per decoding batch size (None: num_lookahead_slots)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int       # tokens fed this step: the uncomputed prefix (prefill) or the last token
    num_lookahead: int        # extra KV slots reserved after them for draft tokens
    is_prefill: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    budget: int | None = None     # the step's draft budget per decoding request (None: nothing decodes)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.policy = config.budget_policy or BudgetPolicy.fixed(config.num_lookahead_slots,
                                                                 config.max_num_seqs)
        self.budget_log = BudgetLog(self.policy.budget(1))

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kept: list[Request] = []
        queue = list(self.running)
        if queue:
            out.budget = self.policy.budget(len(queue))
            self.budget_log.note(out.budget, len(queue))
        while queue:
            req = queue.pop(0)
            lookahead = self.lookahead_for(req, out.budget)
            need = len(req.token_ids) + lookahead
            while not self.kv.can_allocate(req.request_id, need):
                victim = queue.pop() if queue else req
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                self.kv.allocate(req.request_id, need)
                kept.append(req)
                n = len(req.token_ids) - req.num_computed_tokens
                out.scheduled.append(ScheduledRequest(req, n, lookahead, is_prefill=False))
                budget -= n + lookahead
        self.running = kept
        if out.preempted:
            return out
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = len(req.token_ids)
            if (n > budget and self.running) or not self.kv.can_allocate(req.request_id, n):
                break
            self.waiting.popleft()
            self.kv.allocate(req.request_id, n)
            req.status = Status.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, 0, is_prefill=True))
            budget -= n
        return out

    def lookahead_for(self, req: Request, budget: int) -> int:
        """Draft slots worth reserving: the step's ``budget`` unless the request names its own (at most
        ``num_lookahead_slots`` either way); none past the context window or beyond the remaining
        max_tokens."""
        remaining = req.params.max_tokens - req.num_output_tokens - 1
        room = self.config.max_model_len - len(req.token_ids)
        wanted = req.params.draft_tokens if req.params.draft_tokens is not None else budget
        return max(0, min(self.config.num_lookahead_slots, wanted, remaining, room))

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it re-enters the queue front and is recomputed from its tokens."""
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def commit(self, req: Request, new_tokens: list[int]) -> list[int]:
        """Record a step's tokens (accepted drafts + bonus); returns those kept before any stop."""
        req.num_computed_tokens = len(req.token_ids) + len(new_tokens) - 1
        kept: list[int] = []
        for tok in new_tokens:
            kept.append(tok)
            reason = req.append_token(tok)
            if reason:
                req.finish_reason = reason
                break
        self.kv.trim(req.request_id, req.num_computed_tokens)
        return kept

    def finish(self, req: Request, reason: str) -> None:
        """End a request (stop condition, abort or error) and free its KV blocks."""
        req.finish_reason = req.finish_reason or reason
        req.status = Status.FINISHED
        self.kv.free(req.request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, "abort")
        return req
