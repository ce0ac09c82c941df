"""SWIFT: training-free layer-skip self-speculation (arXiv 2410.06916), with its on-the-fly layer-set search.

The target drafts for itself with some attention and MLP sub-layers skipped (``drafters.swift_search``
holds the skip set of every task and searches for a better one while it serves). Per step, for the
requests of one task (batched):

- acceleration (§4.3): the skipped model extends a greedy chain from the root, one batched forward per
  depth, stopping a request once its top-1 probability falls below ``stop_threshold`` (or after
  ``max_draft_steps`` or its budget). Every depth also gets siblings off the chain, more when the
  drafter is less sure (the dynamic verification tree). Sampled requests draw the chain token and its
  siblings without replacement from the skipped model's processed distribution ``q``, which the tree
  carries so verification can reject exactly with it; greedy requests take the top candidates.
- optimisation (§4.2): before drafting, one search iteration per task scores a candidate skip set by
  "matchness": a teacher-forced forward of the skipped model over the request's most recent generated
  window, whose predictions are compared with the tokens the target actually generated.

Drafting writes KV only into the requests' lookahead slots (positions from the root on, which the
verify pass rewrites) and the matchness forward only into scratch blocks lent by the runner, so the
committed KV is never touched (``TargetAccess``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafters.base import Drafter, DraftRequest, TargetAccess
from drafters.swift_config import SwiftConfig
from drafters.swift_search import SearchStore, matchness
from drafters.swift_skipset import SkipSet
from drafters.tree import DraftTree
from kernels.metadata import SeqAttention
from server.worker.device import now
from server.worker.sampling import new_generator, processed_probs

log = logging.getLogger(__name__)


def candidates_for(p1: float, levels: tuple[float, ...], counts: tuple[int, ...]) -> int:
    """Candidates at a depth whose top-1 probability is ``p1``: ``counts[i]`` above ``levels[i]``, else the last."""
    return next((n for level, n in zip(levels, counts) if p1 > level), counts[-1])


@dataclass
class _Chain:
    """One request's tree while it is drafted."""

    ask: DraftRequest
    generator: torch.Generator | None
    next_input: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    q_rows: dict[int, torch.Tensor] = field(default_factory=dict)   # tree row -> q its children came from
    last_node: int = -1
    log_p: float = 0.0
    depth: int = 0
    done: bool = False

    @property
    def start(self) -> int:
        return len(self.ask.token_ids) - 1

    def grow(self, logits: torch.Tensor, config: SwiftConfig) -> None:
        """Add the next depth's candidates from the skipped model's ``logits [V]`` after the chain's tip."""
        params = self.ask.params
        room = self.ask.budget - len(self.tokens)
        if params.greedy:
            probs = logits.softmax(-1)                                                  # [V]
            p1 = float(probs.max())
            n = min(candidates_for(p1, config.confidence_levels, config.greedy_candidates), room)
            picks = probs.topk(n).indices if n > 0 else probs.new_empty(0, dtype=torch.long)
        else:
            probs = processed_probs(logits[None], params)[0]                            # [V] q
            p1 = float(probs.max())
            n = min(candidates_for(p1, config.confidence_levels, config.sampling_candidates), room,
                    int((probs > 0).sum()))
            picks = torch.multinomial(probs, n, replacement=False, generator=self.generator) if n > 0 else None
            if n > 0:
                self.q_rows[self.last_node + 1] = probs
        if n <= 0:
            self.done = True
            return
        picked = picks.tolist()
        logs = probs[picks].clamp_min(1e-30).log().tolist()
        first = len(self.tokens)
        for tok, lp in zip(picked, logs):
            self.tokens.append(tok)
            self.parents.append(self.last_node)
            self.scores.append(self.log_p + lp)
        self.last_node, self.next_input, self.log_p = first, picked[0], self.log_p + logs[0]
        self.depth += 1
        self.done = p1 < config.stop_threshold or self.depth >= config.max_draft_steps or n >= room

    def tree(self, vocab: int) -> DraftTree:
        q = None
        if self.q_rows:
            q = torch.zeros(len(self.tokens) + 1, vocab, device=next(iter(self.q_rows.values())).device)
            for row, dist in self.q_rows.items():
                q[row] = dist
        return DraftTree(self.tokens, self.parents, self.scores, draft_probs=q)


class SwiftDrafter(Drafter):
    name = "swift"
    calibratable = False   # drafting runs the target over real block tables: measured while serving instead

    def __init__(self, num_layers: int, max_tree_tokens: int, default_task: str, config: SwiftConfig | None = None):
        self.config = config or SwiftConfig()
        self.max_tree_tokens = max_tree_tokens
        self.num_layers = num_layers
        self.default_task = default_task
        path = Path(self.config.skip_sets) if self.config.skip_sets else None
        self.store = (SearchStore.load(path, self.config.search, num_layers=num_layers, default_key=default_task)
                      if path and path.is_file() else SearchStore(num_layers, self.config.search, default_task))
        self.store.get(default_task)               # the default task always has its search
        self.target: TargetAccess | None = None
        self.generators: dict[str, torch.Generator] = {}
        self.seconds = {"optimise": 0.0, "draft": 0.0}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swift-search")
        self.pending: dict[str, Future] = {}

    def bind(self, target: TargetAccess) -> None:
        self.target = target

    def task_of(self, ask: DraftRequest) -> str:
        """The request's task key; a new key beyond ``max_tasks`` searches nothing and drafts as the default."""
        key = ask.params.task or self.default_task
        if key not in self.store and len(self.store) >= self.config.max_tasks:
            return self.default_task
        self.store.get(key)
        return key

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        if self.target is None:
            raise RuntimeError("the SWIFT drafter drafts with the target: the runner must bind it first")
        groups: dict[str, list[int]] = {}
        for i, ask in enumerate(requests):
            groups.setdefault(self.task_of(ask), []).append(i)
        trees: list[DraftTree | None] = [None] * len(requests)
        for task, members in groups.items():
            search = self.store.get(task)
            t0 = now(self.target.device)
            if self.config.optimise and not search.done:
                self.optimise(task, [requests[i] for i in members])
            t1 = now(self.target.device)
            for i, tree in zip(members, self.draft([requests[i] for i in members], search.best)):
                trees[i] = tree
            self.seconds["optimise"] += t1 - t0
            self.seconds["draft"] += now(self.target.device) - t1
        return trees

    def bench_report(self) -> dict:
        """Per task: the skip set in force, its share of skipped sub-layers, the search's progress and
        matchness history; and the seconds spent searching vs drafting (for the benchmark)."""
        tasks = {}
        keys = self.store.keys()
        for key in keys:
            s = self.store.get(key)
            tasks[key] = {"skip": s.best.to_json(), "skip_ratio": s.best.ratio, "best_matchness": s.best_score,
                          "iterations": s.iteration, "done": s.done, "stop_reason": s.stop_reason,
                          "history": s.history}
        return {"tasks": tasks, "seconds": dict(self.seconds)}

    def draft(self, asks: list[DraftRequest], skip: SkipSet) -> list[DraftTree]:
        """The dynamic trees of ``asks``, one batched forward of the skipped target per depth."""
        chains = [_Chain(a, self._generator(a), a.token_ids[-1]) for a in asks]
        live = [c for c in chains if c.ask.budget > 0]
        while live:
            seqs = [SeqAttention(self.target.block_table(c.ask.request_id), c.start + c.depth, 1) for c in live]
            hidden = self.target.forward([c.next_input for c in live], [c.start + c.depth for c in live], seqs,
                                         skip.attn, skip.mlp)                                  # [B, hidden]
            logits = self.target.model.compute_logits(hidden).float()                          # [B, V]
            for c, row in zip(live, logits):
                c.grow(row, self.config)
            live = [c for c in live if not c.done]
        vocab = self.target.model.config.vocab_size
        return [c.tree(vocab) for c in chains]

    def optimise(self, task: str, asks: list[DraftRequest]) -> None:
        """One search iteration for ``task``, scored on the first request with a long enough generated window."""
        window = self.config.search.context_window + 1
        ask = next((a for a in asks if len(a.token_ids) - a.num_prompt_tokens > window), None)
        if ask is None:
            return
        search = self.store.get(task)
        candidate = self._candidate(task, search)
        if candidate is None:
            return
        score = self.matchness(ask, candidate, window)
        if score is None:
            return
        search.report(candidate, score)
        if search.done:
            log.info("SWIFT task %r: search finished after %d iterations: matchness %.3f, skipping %d attention "
                     "and %d MLP sub-layers", task, search.iteration, search.best_score, len(search.best.attn),
                     len(search.best.mlp))
            if self.config.skip_sets:
                self.store.save(Path(self.config.skip_sets))

    def _candidate(self, task: str, search) -> SkipSet | None:
        """The next set to score: the initial set first (the baseline), then the search's proposals. A
        Bayesian-optimisation proposal (seconds of GP fitting) is computed in a worker thread while the
        engine keeps drafting with the set in force: None until it is ready. The engine thread leaves the
        task's search alone meanwhile."""
        pending = self.pending.get(task)
        if pending is not None:
            if not pending.done():
                return None
            del self.pending[task]
            return pending.result()
        if not search.history:
            return search.best
        if search.is_bayes_turn():
            self.pending[task] = self.worker.submit(search.propose)
            return None
        return search.propose()

    @torch.inference_mode()
    def matchness(self, ask: DraftRequest, skip: SkipSet, window: int) -> float | None:
        """Share of the last ``window`` committed tokens the skipped target predicts from their own prefix
        (one teacher-forced forward, its KV in scratch blocks); None when no scratch blocks are free."""
        bs, committed = self.target.block_size, len(ask.token_ids) - 1       # the root is not committed yet
        begin = (committed - window) // bs * bs                               # block-aligned: reuse whole blocks
        n = committed - begin
        with self.target.scratch(-(-n // bs)) as blocks:
            if blocks is None:
                return None
            table = self.target.block_table(ask.request_id)[:begin // bs] + blocks
            hidden = self.target.forward(ask.token_ids[begin:committed], list(range(begin, committed)),
                                         [SeqAttention(table, begin, n)], skip.attn, skip.mlp)  # [n, hidden]
            predicted = self.target.model.compute_logits(hidden[-window:]).argmax(-1).tolist()
        # the prediction after the root (not computed) is the one matchness ignores
        return matchness([*predicted, -1], ask.token_ids[committed - window:committed + 1])

    def _generator(self, ask: DraftRequest) -> torch.Generator | None:
        if ask.params.greedy:
            return None
        gen = self.generators.get(ask.request_id)
        if gen is None:
            seed = None if ask.params.seed is None else ask.params.seed + 0x5EED
            gen = self.generators[ask.request_id] = new_generator(seed, self.target.device)
        return gen

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

