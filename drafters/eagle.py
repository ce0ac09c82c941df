"""EAGLE drafter with EAGLE-2 dynamic draft trees (confidence-ordered expansion + rerank).

Per request the drafter keeps its own KV over (feature, next token) pairs of the committed
context, in a row of a preallocated buffer (``drafters.draft_kv.DraftKV``). Each step, for the
requests sharing a tree shape: (a) one batched context pass over the pairs committed since the
last step, written into the rows in place; (b) up to ``depth`` expansion forwards
(``drafters.expansion``), each on the ``top_k`` frontier nodes of every request (global score =
sum of drafter log-probs along the path; all ``top_k**2`` children enter the pool, the best
``top_k`` become the next frontier), stopping early once no deeper node could make the
rerank; (c) one host transfer of the pool and its rerank (``top_k + depth * top_k**2`` nodes
at most) to the verify budget with ancestor closure enforced (``drafters.tree.rerank``).
Drafting is deterministic top-k, so verification uses q = 1 (lossless).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.draft_kv import DraftKV, KVBatch, Slots
from drafters.eagle_model import EagleDrafter
from drafters.expansion import DraftContext, Expansion, Pool, PoolBuilder, gather_rows
from drafters.expansion_graphs import StaticContext, StaticExpansion
from drafters.tree import DraftTree


@dataclass
class _State:
    length: int = 0                           # committed pairs in the request's KV row
    pending_features: list[torch.Tensor] = field(default_factory=list)  # [n_i, F] each (F: feature_width)
    pending_tokens: list[int] = field(default_factory=list)
    last_hidden: torch.Tensor | None = None   # [H] drafter output at the last committed pair


class EagleTreeDrafter(Drafter):
    name = "eagle"
    default_depth = 5
    max_pending = 128   # pending (feature, token) pairs of one request that trigger an immediate context pass

    def __init__(self, model: EagleDrafter, total_tokens: int = 16, depth: int | None = None, top_k: int = 4):
        self.model = model
        self.max_tree_tokens = total_tokens
        self.depth, self.top_k = depth or self.default_depth, top_k
        self.states: dict[str, _State] = {}
        cfg, weight = model.config, model.embed_weight                              # activations' dtype
        self.aux_layers = cfg.aux_layers                  # the runner appends these target layers to each feature
        self.feature_width = cfg.hidden_size * (1 + len(cfg.aux_layers))
        self.kv = DraftKV(cfg.num_hidden_layers * cfg.num_key_value_heads, cfg.head_dim, weight.dtype, weight.device)
        self.static: StaticExpansion | None = None   # the graphed expansion of the default shape, once enabled
        self.static_context: StaticContext | None = None

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Freeze the drafter KV (``max_num_seqs`` rows, every position plus the tree's scratch columns) and run
        the context pass and the default tree shape's expansion from CUDA graphs (``drafters.expansion_graphs``;
        ``capture=False`` runs the same fixed-shape code eagerly)."""
        scratch, hidden = self.depth * self.top_k, self.model.config.hidden_size
        self.kv.freeze(max(max_num_seqs, len(self.kv.owners)), max_model_len + scratch)
        self.static = StaticExpansion(self.expand, self.kv, self.top_k, self.depth, hidden, capture)
        self.static_context = StaticContext(self.context_forward, self.kv, self.feature_width, scratch, capture)

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        for u in updates:
            if u.reset or u.request_id not in self.states:
                self.states[u.request_id] = _State()
                self.kv.allocate(u.request_id)
            st = self.states[u.request_id]
            if u.features.shape[-1] != self.feature_width:
                raise ValueError(f"feature rows of width {u.features.shape[-1]}; this drafter reads "
                                 f"{self.feature_width} (the last hidden state and target layers {list(self.aux_layers)})")
            st.pending_features.append(u.features)
            st.pending_tokens.extend(u.fed_tokens[1:] + [u.next_token])  # f_t pairs with x_{t+1}
            if len(st.pending_tokens) >= self.max_pending:
                self.absorb(u.request_id)

    @torch.inference_mode()
    def absorb(self, request_id: str) -> None:
        """Run one request's pending pairs through the drafter now (a long prompt's prefill chunks are
        absorbed as they arrive, never in one stall at its first draft)."""
        st = self.states[request_id]
        width = st.length + len(st.pending_tokens)
        self.kv.reserve(width)
        self.context_pass(self.kv.batch([request_id], width), [st], len(st.pending_tokens))

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self.kv.free(request_id)

    def tree_shape(self) -> tuple[int, int]:
        return self.depth, self.top_k

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """Requests sharing a tree shape (top_k, depth) are drafted together, in KV row order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            shape = (r.params.draft_top_k or self.top_k, r.params.draft_depth or self.depth)
            groups.setdefault(shape, []).append(i)
        trees: list[DraftTree | None] = [None] * len(requests)
        for (k, depth), members in groups.items():
            members.sort(key=lambda i: self.kv.rows[requests[i].request_id])
            budgets = [min(requests[i].budget, self.max_tree_tokens) for i in members]
            pool = self.draft([requests[i].request_id for i in members], k, depth, budgets)
            for i, tree in zip(members, self.trees(pool, budgets)):
                trees[i] = tree
        return trees

    @torch.inference_mode()
    def draft(self, request_ids: list[str], k: int, depth: int, budgets: list[int]) -> Pool:
        """Context pass and expansion for a batch of requests -> their candidate pool (on device)."""
        states = [self.states[r] for r in request_ids]
        new = max(len(s.pending_tokens) for s in states)
        base = max(s.length + len(s.pending_tokens) for s in states)
        width = max(base + depth * k, max(s.length for s in states) + new)
        self.kv.reserve(width)
        batch = self.kv.batch(request_ids, width)
        rows = [self.kv.rows[r] for r in request_ids]
        if new and self.static_context is not None and self.static_context.fits(rows, new):
            self.static_context_pass(states, new)
        elif new:
            self.context_pass(batch, states, new)
        device = self.kv.keys.device
        lengths = torch.tensor([s.length for s in states], device=device)                      # [B]
        last = torch.stack([s.last_hidden for s in states])                                     # [B, H]
        if (self.static is not None and (k, depth) == (self.top_k, self.depth)
                and self.static.fits(rows, [s.length for s in states])):
            return self.static.run(lengths, last)
        return self.expand(DraftContext(batch, lengths, base, last), k, depth, PoolBuilder(budgets, device))

    def context_pass(self, batch: KVBatch, states: list[_State], new: int) -> None:
        """Run each row's pending pairs (``new`` columns at most) through the drafter, writing their KV after
        its committed length."""
        device = self.kv.keys.device
        tokens, feats = self.pending_inputs(states, len(states), new)                      # [B, n], [B, n, F]
        lengths = torch.tensor([s.length for s in states], device=device)                     # [B]
        start = states[0].length if len(states) == 1 else lengths
        hidden, columns = self.context_forward(batch, tokens, feats, lengths, max(s.length for s in states) + new,
                                               start)                                        # [B, n, H], [B, n]
        self.kv.write_back(batch, columns)
        self.commit(states, gather_rows(hidden, self.last_pending(states)[:, None])[:, 0])

    def static_context_pass(self, states: list[_State], new: int) -> None:
        """``context_pass`` for rows ``0 .. n - 1`` through ``static_context`` (a CUDA graph once enabled)."""
        device = self.kv.keys.device
        rows, width = self.static_context.shape(len(states), new)
        tokens, feats = self.pending_inputs(states, rows, width)                              # [R, N], [R, N, F]
        lengths = torch.tensor([s.length for s in states], device=device)                     # [n]
        self.commit(states, self.static_context.run(tokens, feats, lengths, self.last_pending(states)))

    def last_pending(self, states: list[_State]) -> torch.Tensor:
        """``[B]`` each row's index of its last pending pair (0 for a row with none)."""
        return torch.tensor([max(len(s.pending_tokens), 1) - 1 for s in states], device=self.kv.keys.device)

    def pending_inputs(self, states: list[_State], rows: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending pairs of ``states`` as tokens ``[rows, new]`` and features ``[rows, new, F]`` (zeros past each
        row's count and for rows past ``len(states)``), in one host-to-device copy and one ``index_copy``."""
        device, dtype = self.kv.keys.device, self.kv.keys.dtype
        host = np.zeros((rows, new), dtype=np.int64)
        for b, s in enumerate(states):
            host[b, :len(s.pending_tokens)] = s.pending_tokens
        flat = [b * new + j for b, s in enumerate(states) for j in range(len(s.pending_tokens))]   # [sum counts]
        feats = torch.zeros(rows * new, self.feature_width, dtype=dtype, device=device)      # [rows * n, F]
        pending = torch.cat([f for s in states for f in s.pending_features]).to(device, dtype)  # [sum counts, F]
        feats.index_copy_(0, torch.tensor(flat, device=device), pending)
        return torch.from_numpy(host).to(device), feats.view(rows, new, -1)

    def context_forward(self, batch: KVBatch, tokens: torch.Tensor, feats: torch.Tensor, lengths: torch.Tensor,
                        width: int, start: int | torch.Tensor, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, n]`` and features ``[B, n, F]`` (the target's last hidden state, then its ``aux_layers``) after
        each row's ``lengths [B]`` committed pairs, attending over ``width`` columns (row b, token t sees columns
        <= length_b + t; ``masked``: even for one row and token) -> hidden ``[B, n, H]`` and the columns their
        keys/values went to ``[B, n]``."""
        rows, new = tokens.shape
        device = tokens.device
        columns = lengths[:, None] + torch.arange(new, device=device)                        # [B, n]
        mask = None
        if rows > 1 or new > 1 or masked:
            mask = (torch.arange(width, device=device)[None, None, :] <= columns[:, :, None]).unsqueeze(1)
        positions = columns.clamp(max=self.model.config.max_position_embeddings - 1)
        h = self.model.config.hidden_size
        aux = feats[..., h:] if self.aux_layers else None                                    # [B, n, k H]
        hidden = self.model.step(tokens, feats[..., :h], positions, Slots(batch, self.model.kv_heads, start, width),
                                 mask, aux)
        return hidden, columns

    @staticmethod
    def commit(states: list[_State], last: torch.Tensor) -> None:
        """The pending pairs are in the KV now: ``last [B, H]`` is each row's output at its last pair."""
        for b, s in enumerate(states):
            if s.pending_tokens:
                s.last_hidden = last[b]
                s.length += len(s.pending_tokens)
                s.pending_features, s.pending_tokens = [], []

    def expand(self, ctx: DraftContext, k: int, depth: int, pool: PoolBuilder) -> Pool:
        """EAGLE-2: every child of every expanded node enters the pool (``k + depth * k * k`` nodes at most)."""
        expansion = Expansion(self.model, ctx, k, depth)
        frontier, nodes = expansion.roots(pool)                                               # [B, k]
        for layer in expansion.layers(frontier, pool):
            children = pool.add(layer.children, nodes.repeat_interleave(k, dim=1), layer.scores)  # [B, k * k]
            nodes = children.gather(1, layer.sel)
        return pool.build()

    def trees(self, pool: Pool, budgets: list[int]) -> list[DraftTree]:
        """One host transfer of the whole pool, then each request's rerank to its budget."""
        return pool.trees(budgets)
