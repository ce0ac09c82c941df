"""Owns the model and the KV tensors; turns a ``SchedulerOutput`` into one forward and committed tokens.

Prefills feed a chunk of their uncomputed tokens causally (only a chunk that reaches the last token
samples one). Decoding requests feed their root
(the last committed token) plus, when a drafter is set, its draft tree: positions
are prefix length + depth and each tree token attends to its ancestors only. The
accepted path's KV is then compacted into contiguous slots.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from drafters.accept import AcceptResult, greedy_accept, sample_accept
from drafters.base import AcceptUpdate, Drafter, DraftRequest, TargetAccess
from drafters.tree import DraftTree
from kernels import SeqAttention, get_backend, slots_for
from server.cache.kv_manager import KVManager
from server.engine.outputs import RunnerOutput
from server.engine.scheduler import ScheduledRequest, SchedulerOutput
from server.models.llama import LlamaModel
from server.worker.cuda_graphs import GraphRunner
from server.worker.device import now
from server.worker.sampling import new_generator, processed_probs, sample_token

log = logging.getLogger(__name__)


def kv_bytes_per_token(model: LlamaModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVManager, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 drafter: Drafter | None = None, attention_backend: str | None = None):
        self.model = model
        self.kv = kv
        self.drafter = drafter
        self.device = torch.device(device)
        self.backend = get_backend(kv.block_size, self.device, attention_backend)
        self.graphs: GraphRunner | None = None
        c = model.config
        shape = (kv.pool.num_blocks + 1, kv.block_size, c.num_key_value_heads, c.head_dim)  # + a scratch block
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device))
                          for _ in range(c.num_hidden_layers)]
        if drafter is not None:
            drafter.bind(TargetAccess(model, self.forward_skipping, kv.block_table, self.scratch_blocks,
                                      kv.block_size, self.device))
        model.aux_layers = tuple(drafter.aux_layers) if drafter is not None else ()
        if any(not 0 <= i < c.num_hidden_layers for i in model.aux_layers):
            raise ValueError(f"the drafter reads target layers {list(model.aux_layers)}; the target has "
                             f"{c.num_hidden_layers} (0-based)")
        self.generators: dict[str, torch.Generator] = {}
        self._rng_states: dict[str, torch.Tensor] = {}   # sampled requests' generator states before the last execute
        log.info("KV cache: %d blocks x %d slots (%.1f MiB); attention backend %s", kv.pool.num_blocks,
                 kv.block_size, kv.capacity_tokens * kv_bytes_per_token(model, dtype) / 2**20, self.backend.name)

    def enable_cuda_graphs(self, max_num_seqs: int, max_tree_tokens: int, max_model_len: int) -> None:
        """Capture the decode/verify forward for up to ``max_num_seqs`` requests of ``1 + max_tree_tokens``."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need --device cuda")
        self.graphs = GraphRunner(self.model, self.backend, self.kv_caches, max_num_seqs,
                                  max_num_seqs * (1 + max_tree_tokens), max_tree_tokens, max_model_len,
                                  scratch_block=self.kv.pool.num_blocks)
        self.graphs.capture()
        if self.drafter is not None:
            self.drafter.enable_cuda_graphs(max_num_seqs, max_model_len)

    def forward(self, ids: list[int], positions: list[int], seqs: list[SeqAttention],
                has_prefill: bool = False) -> torch.Tensor:
        """Post-norm hidden ``[T, hidden]`` of one step: a CUDA-graph replay when one fits, else eager."""
        if self.graphs is not None and not has_prefill:
            hidden = self.graphs.run(ids, positions, seqs)
            if hidden is not None:
                return hidden
        meta = self.backend.build_metadata(seqs)
        return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                          self.kv_caches, meta, self.backend)

    def forward_skipping(self, ids: list[int], positions: list[int], seqs: list[SeqAttention],
                         skip_attn: Collection[int] = (), skip_mlp: Collection[int] = ()) -> torch.Tensor:
        """An eager forward with sub-layers skipped (self-speculative drafting): hidden ``[T, hidden]``."""
        meta = self.backend.build_metadata(seqs)
        return self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                          self.kv_caches, meta, self.backend, skip_attn, skip_mlp)

    @contextmanager
    def scratch_blocks(self, n: int) -> Iterator[list[int] | None]:
        """Lend ``n`` free KV blocks for the duration of the block (``None`` when the pool cannot spare them)."""
        pool = self.kv.pool
        blocks = pool.allocate(n) if pool.can_allocate(n) else None
        try:
            yield blocks
        finally:
            if blocks:
                pool.free(blocks)

    def _trees(self, sched: SchedulerOutput) -> dict[str, DraftTree]:
        decode = [s for s in sched.scheduled if not s.is_prefill and s.num_lookahead > 0]
        if self.drafter is None or not decode:
            return {}
        asks = [DraftRequest(s.request.request_id, s.request.token_ids, s.request.params, s.num_lookahead,
                             s.request.num_prompt_tokens) for s in decode]
        return {a.request_id: t for a, t in zip(asks, self.drafter.propose(asks))}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """One target forward over all prefills and (tree-)decodes; returns committed tokens.

        Nothing here commits: if it raises, ``rollback`` and a rerun (of all or some requests) is safe
        (KV past a request's committed tokens is rewritten; the drafter re-proposes)."""
        t0 = now(self.device)
        self._rng_states = {s.request.request_id: self.generators[s.request.request_id].get_state()
                            for s in sched.scheduled
                            if not s.request.params.greedy and s.request.request_id in self.generators}
        trees = self._trees(sched)
        t1 = now(self.device)
        ids, positions, seqs = [], [], []
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            tree = trees.get(req.request_id)
            if tree is None:
                end = start + s.num_new_tokens
                ids.extend(req.token_ids[start:end])
                positions.extend(range(start, end))
                seqs.append(SeqAttention(self.kv.block_table(req.request_id), start, s.num_new_tokens))
            else:
                ids.append(req.token_ids[-1])
                ids.extend(tree.tokens)
                positions.extend((start + tree.position_offsets()).tolist())
                seqs.append(SeqAttention(self.kv.block_table(req.request_id), start, len(tree) + 1,
                                         tree.ancestor_mask(include_root=True)))
        hidden = self.forward(ids, positions, seqs, any(s.is_prefill for s in sched.scheduled))   # [T, hidden]
        n_logits = [seq.num_new if seq.tree_mask is not None else int(not s.partial)   # every tree row, else last
                    for s, seq in zip(sched.scheduled, seqs)]                               # (none: partial chunk)
        ends = torch.tensor([seq.num_new for seq in seqs]).cumsum(0).tolist()
        wanted = [i for end, n in zip(ends, n_logits) for i in range(end - n, end)]
        logits = self.model.compute_logits(hidden[wanted]).float()                 # [R, V]
        greedy = any(s.request.params.greedy for s in sched.scheduled)
        best = logits.argmax(-1).tolist() if greedy else []                        # [R]: one host read for all
        t2 = now(self.device)
        out, updates, moves, row = RunnerOutput(), [], [], 0
        for s, seq, end, n in zip(sched.scheduled, seqs, ends, n_logits):
            updates.append(self._finish_request(s, hidden[end - seq.num_new:end], logits[row:row + n],
                                                best[row:row + n], trees.get(s.request.request_id), out, moves))
            row += n
        self._compact(moves)
        if self.drafter is not None:
            self.drafter.on_accept(updates)
        out.timings = {"draft": t1 - t0, "forward": t2 - t1, "accept": now(self.device) - t2}
        return out

    def _finish_request(self, s: ScheduledRequest, rows: torch.Tensor, logits: torch.Tensor, best: list[int],
                        tree: DraftTree | None, out: RunnerOutput, moves: list[np.ndarray]) -> AcceptUpdate:
        """Sample or accept for one request. ``rows`` [n, hidden] its features, ``logits`` [0, 1 or n, V],
        ``best`` their argmax (greedy requests); the KV moves of an accepted path join ``moves``."""
        req = s.request
        rid, start = req.request_id, req.num_computed_tokens
        if s.partial:                                   # a prefill chunk: the next prompt token follows it
            end = start + s.num_new_tokens
            out.new_tokens[rid] = []
            return AcceptUpdate(rid, start, req.token_ids[start:end], rows, req.token_ids[end], reset=s.first_chunk)
        gen = self.generators.get(rid)
        if gen is None:
            gen = self.generators[rid] = new_generator(req.params.seed, self.device)
        if tree is None:
            token = best[-1] if req.params.greedy else sample_token(logits[-1], req.params, gen)
            out.new_tokens[rid] = [token]
            if not s.is_prefill and self.drafter is not None:
                out.drafted[rid], out.accepted[rid] = 0, 0
            return AcceptUpdate(rid, start, req.token_ids[start:], rows, token, reset=s.first_chunk)
        result = self._accept(tree, logits, best, req.params, gen)
        moves.extend(self._moves(rid, start, result))
        out.new_tokens[rid] = result.emitted
        out.drafted[rid], out.accepted[rid] = len(tree), result.accept_length
        keep = [0] + [n + 1 for n in result.nodes]                                 # root + accepted rows
        return AcceptUpdate(rid, start, [req.token_ids[-1]] + result.tokens, rows[keep], result.bonus)

    @staticmethod
    def _accept(tree: DraftTree, logits: torch.Tensor, best: list[int], params, gen: torch.Generator) -> AcceptResult:
        if params.greedy:
            return greedy_accept(tree, torch.tensor(best))
        return sample_accept(tree, processed_probs(logits, params), gen, tree.draft_probs)

    def _moves(self, rid: str, start: int, result: AcceptResult) -> list[np.ndarray]:
        """``[2, m]`` flat (source, destination) slots taking accepted nodes' KV from their tree slots to the
        contiguous slots after the root (none when the path is already in place)."""
        pairs = [(node, i) for i, node in enumerate(result.nodes) if node != i]   # (tree index, depth - 1)
        if not pairs:
            return []
        tree_slots = slots_for(self.kv.block_table(rid), start + 1, start + 2 + result.nodes[-1], self.kv.block_size)
        return [tree_slots[np.array(pairs).T]]

    def _compact(self, moves: list[np.ndarray]) -> None:
        """Every request's KV moves of this step in one gather and one scatter per layer (requests' slots are
        disjoint, and each gather reads before its scatter writes)."""
        if not moves:
            return
        src, dst = torch.from_numpy(np.concatenate(moves, axis=1)).to(self.device)   # [m] each
        for k_cache, v_cache in self.kv_caches:
            self.backend.copy_slots(k_cache, v_cache, src, dst)

    def rollback(self) -> None:
        """Undo the random draws of the last ``execute`` (before rerunning its requests)."""
        for rid, state in self._rng_states.items():
            if rid in self.generators:
                self.generators[rid].set_state(state)

    def release(self, request_id: str) -> None:
        """Forget per-request state when a request ends."""
        self.generators.pop(request_id, None)
        if self.drafter is not None:
            self.drafter.release(request_id)
