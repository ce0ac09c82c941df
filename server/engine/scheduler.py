"""Continuous-batching scheduler (torch-free): one token-accounting model, chunked prefill, lookahead
slots, preemption by recompute.

As in vLLM v1 there is no prefill/decode split: a request's ``num_computed_tokens`` catches up with its
``token_ids``. Each step has a token budget (``max_num_batched_tokens``) shared by decodes and tree
verifies (scheduled first) and prefill chunks; a long prompt is split into chunks over several steps,
and a chunk that stops short of the last token emits nothing. ``max_prefill_attention`` also bounds the
(query, key) pairs a step's prefill chunks attend to, so chunks shrink as a long context grows and no
step stalls the streams running beside it.

The draft budget of a step follows the load: the number of decoding requests at the start of the step
picks it from the ``BudgetPolicy``, and every decoding request of that step gets it (unless its own
``draft_tokens`` says otherwise), capped by its remaining tokens, the context window and the step's
token budget. Its lookahead KV slots are reserved to match. A ``ServedBudgets`` policy also probes the
alternative budget now and then, and ``observe`` reports each clean step back to it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from server.cache.kv_manager import KVManager
from server.engine.budget import BudgetLog, BudgetPolicy
from server.engine.budget_feedback import ServedBudgets
from server.engine.request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192  # tokens fed per step: decodes, tree tokens and prefill chunks
    num_lookahead_slots: int = 0  # most KV slots reserved per running request for draft-tree tokens
    max_model_len: int = 1 << 30  # lookahead never reaches past the context window
    budget_policy: BudgetPolicy | ServedBudgets | None = None  # per decoding batch size (None: lookahead slots)
    max_prefill_attention: int = 0  # most (query, key) pairs of a step's prefill chunks (0: unbounded)
    min_prefill_chunk: int = 16   # the first chunk of a step gets at least this many tokens (progress)


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int       # tokens fed this step: a prefill chunk, or the last token (the tree root)
    num_lookahead: int        # extra KV slots reserved after them for draft tokens
    is_prefill: bool          # feeds uncomputed tokens (a whole or partial prompt/recompute), no tree
    partial: bool = False     # a prefill chunk short of the last token: computes KV, emits no token
    first_chunk: bool = False  # the first step since admission (drafters drop any state they hold)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    budget: int | None = None     # the step's draft budget per decoding request (None: nothing decodes)
    num_decoding: int = 0         # decoding requests at the start of the step (they chose the budget)
    prefix_query_tokens: int = 0  # tokens of the requests admitted this step
    prefix_hit_tokens: int = 0    # of which the prefix cache already held the KV

    @property
    def empty(self) -> bool:
        return not self.scheduled


def is_decoding(req: Request) -> bool:
    """Every token but the last (the next tree root) has its KV: the request feeds one token plus drafts."""
    return 0 < req.num_computed_tokens == len(req.token_ids) - 1


def seeded_sample(req: Request) -> bool:
    """A seeded sampled request: its output must not depend on the load, so it drafts only on a budget of
    its own."""
    return req.params.seed is not None and not req.params.greedy


def follows_step_budget(req: Request) -> bool:
    """Whether ``req`` drafts the step's budget in the server's tree shape (names no budget, shape or SWIFT
    task of its own, and is not a seeded sample): only steps of such requests measure the budget."""
    p = req.params
    own = (p.draft_tokens, p.draft_depth, p.draft_top_k, p.task)
    return all(o is None for o in own) and not seeded_sample(req)


def chunk_within(pairs: float, context: int) -> int:
    """Most tokens ``n`` of a chunk after ``context`` computed tokens with ``n * (context + n) <= pairs``."""
    if math.isinf(pairs):
        return 1 << 62
    return int((math.sqrt(context * context + 4 * max(pairs, 0.0)) - context) / 2)


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

    def observe(self, out: SchedulerOutput, tokens: int, seconds: float) -> None:
        """Report a finished step to the budget policy if it was clean: every scheduled request decoded
        (no prefill chunk), none was preempted, and ``tokens`` were committed in ``seconds``."""
        clean = (out.budget is not None and not out.preempted and len(out.scheduled) == out.num_decoding
                 and not any(s.is_prefill or not follows_step_budget(s.request) for s in out.scheduled))
        if clean:
            self.policy.observe(out.num_decoding, out.budget, tokens, seconds,
                                frozenset(s.request.request_id for s in out.scheduled))

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        step = _StepBudget(self.config)
        decoding = [r for r in self.running if is_decoding(r)]
        queue = decoding + [r for r in self.running if not is_decoding(r)]   # decodes and verifies first
        if decoding:
            out.num_decoding = len(decoding)
            out.budget = self.policy.serve(len(decoding))
            self.budget_log.note(self.policy.budget(len(decoding)), len(decoding))
        kept: list[Request] = []
        step.decodes_left = len(decoding)
        while queue:
            req = queue.pop(0)
            planned = self._plan(req, out.budget, step)
            if planned is None:                     # no room in this step's budget: runs next step
                kept.append(req)
                continue
            n, lookahead = planned
            need = req.num_computed_tokens + n + lookahead
            while not self.kv.can_allocate(req.request_id, need):
                victim = queue.pop() if queue else req
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                self.kv.allocate(req.request_id, need)
                kept.append(req)
                out.scheduled.append(step.take(req, n, lookahead))
        self.running = kept
        if out.preempted:
            return out
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.match_prefix(req.request_id, req.token_ids)
            req.num_computed_tokens = hit
            planned = self._plan(req, None, step)
            if planned is None or not self.kv.can_allocate(req.request_id, hit + planned[0]):
                self.kv.free(req.request_id)
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.kv.allocate(req.request_id, hit + planned[0])
            req.status = Status.RUNNING
            req.max_computed_tokens = max(req.max_computed_tokens, hit)
            if req.num_preemptions == 0:
                req.num_cached_tokens = min(hit, req.num_prompt_tokens)
            out.prefix_query_tokens += len(req.token_ids)
            out.prefix_hit_tokens += hit
            self.running.append(req)
            out.scheduled.append(step.take(req, planned[0], 0, first_chunk=True))
        return out

    def _plan(self, req: Request, budget: int | None, step: _StepBudget) -> tuple[int, int] | None:
        """(tokens to feed, lookahead slots) for ``req`` this step, or None when the step has no room."""
        if is_decoding(req):
            step.decodes_left = max(0, step.decodes_left - 1)
            if step.tokens < 1:
                return None
            return 1, max(0, min(self.lookahead_for(req, budget or 0), step.tokens - 1 - step.decodes_left))
        n = step.chunk(req.num_computed_tokens, len(req.token_ids) - req.num_computed_tokens)
        return (n, 0) if n > 0 else None

    def lookahead_for(self, req: Request, budget: int) -> int:
        """Draft slots worth reserving: the step's ``budget`` unless the request names its own (at most
        ``num_lookahead_slots`` either way); none past the context window or beyond the remaining
        max_tokens. A seeded sampled request drafts only when it names its own budget: its output must be
        the same alone and under any load, and the tree (hence the random draws) would follow the load."""
        remaining = req.params.max_tokens - req.num_output_tokens - 1
        room = self.config.max_model_len - len(req.token_ids)
        if req.params.draft_tokens is not None:
            wanted = req.params.draft_tokens
        elif seeded_sample(req):
            wanted = 0
        else:
            wanted = budget
        return max(0, min(self.config.num_lookahead_slots, wanted, remaining, room))

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it re-enters the queue front and is recomputed from its tokens."""
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def advance(self, s: ScheduledRequest) -> None:
        """Record a partial prefill chunk: its KV is computed, no token is emitted."""
        req = s.request
        req.num_computed_tokens += s.num_new_tokens
        req.max_computed_tokens = max(req.max_computed_tokens, req.num_computed_tokens)
        self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens)

    def commit(self, req: Request, new_tokens: list[int]) -> list[int]:
        """Record a step's tokens (accepted drafts + bonus); returns those kept before any stop."""
        req.num_computed_tokens = len(req.token_ids) + len(new_tokens) - 1
        req.max_computed_tokens = max(req.max_computed_tokens, req.num_computed_tokens)
        kept: list[int] = []
        for tok in new_tokens:
            kept.append(tok)
            reason = req.append_token(tok)
            if reason:
                req.finish_reason = reason
                break
        self.kv.trim(req.request_id, req.num_computed_tokens)
        self.kv.cache_blocks(req.request_id, req.token_ids, req.num_computed_tokens)
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


class _StepBudget:
    """What is left of one step's token and prefill-attention budgets."""

    def __init__(self, config: SchedulerConfig):
        self.tokens = config.max_num_batched_tokens
        self.pairs = float(config.max_prefill_attention or math.inf)
        self.min_chunk = config.min_prefill_chunk
        self.any_prefill = False
        self.decodes_left = 0      # decoding requests not planned yet: each keeps one token of the budget

    def chunk(self, computed: int, remaining: int) -> int:
        """Tokens of the next prefill chunk: within both budgets (the step's first chunk gets at least
        ``min_chunk``, so a long context always advances)."""
        n = min(remaining, self.tokens, chunk_within(self.pairs, computed))
        if not self.any_prefill:
            n = max(n, min(remaining, self.tokens, self.min_chunk))
        return n

    def take(self, req: Request, n: int, lookahead: int, first_chunk: bool = False) -> ScheduledRequest:
        self.tokens -= n + lookahead
        prefill = not is_decoding(req)
        if prefill:
            self.pairs -= n * (req.num_computed_tokens + n)
            self.any_prefill = True
        partial = prefill and req.num_computed_tokens + n < len(req.token_ids)
        return ScheduledRequest(req, n, lookahead, is_prefill=prefill, partial=partial, first_chunk=first_chunk)
