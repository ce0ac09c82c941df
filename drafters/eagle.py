"""EAGLE drafter with EAGLE-2 dynamic draft trees (confidence-ordered expansion + rerank).

Per request the drafter keeps its own KV over (feature, next token) pairs of the
committed context. Each step: (a) a context pass over pairs committed since the last
step; (b) ``depth`` expansion forwards batched across requests, each on the ``top_k``
frontier nodes of every request (global score = sum of drafter log-probs along the
path; all ``top_k**2`` children enter the pool, the best ``top_k`` become the next
frontier); (c) rerank of the pool (``top_k + depth * top_k**2`` nodes) to the verify
budget with ancestor closure enforced (``drafters.tree.rerank``).
Drafting is deterministic top-k, so verification uses q = 1 (lossless).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.eagle_model import KV, EagleDrafter
from drafters.tree import DraftTree, rerank


@dataclass
class _State:
    kv: KV | None = None                      # each [1, Hkv * layers, L, D]
    length: int = 0                           # pairs in kv
    pending_features: list[torch.Tensor] = field(default_factory=list)  # [n_i, H] each
    pending_tokens: list[int] = field(default_factory=list)
    last_hidden: torch.Tensor | None = None   # [H] drafter output at the last processed pair


@dataclass
class Pool:
    """Candidate nodes of one batched expansion: ``[B, P]`` each, parent-before-child."""

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor


class EagleTreeDrafter(Drafter):
    name = "eagle"

    def __init__(self, model: EagleDrafter, total_tokens: int = 16, depth: int = 5, top_k: int = 4):
        self.model = model
        self.max_tree_tokens = total_tokens
        self.depth, self.top_k = depth, top_k
        self.states: dict[str, _State] = {}

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        for u in updates:
            if u.reset or u.request_id not in self.states:
                self.states[u.request_id] = _State()
            st = self.states[u.request_id]
            st.pending_features.append(u.features)
            st.pending_tokens.extend(u.fed_tokens[1:] + [u.next_token])  # f_t pairs with x_{t+1}

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """Requests sharing a tree shape (top_k, depth) are expanded together in one batch."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            shape = (r.params.draft_top_k or self.top_k, r.params.draft_depth or self.depth)
            groups.setdefault(shape, []).append(i)
        trees: list[DraftTree | None] = [None] * len(requests)
        for (k, depth), members in groups.items():
            states = [self._context_pass(self.states[requests[i].request_id]) for i in members]
            pool = self.expand(states, k, depth)
            for b, i in enumerate(members):
                trees[i] = rerank(pool.tokens[b].tolist(), pool.parents[b].tolist(), pool.scores[b].tolist(),
                                  min(requests[i].budget, self.max_tree_tokens))
        return trees

    def _context_pass(self, st: _State) -> _State:
        """Run the pairs committed since the last step through the drafter, extending its KV."""
        if st.pending_tokens:
            feats = torch.cat(st.pending_features).unsqueeze(0)                     # [1, n, H]
            n = feats.shape[1]
            tokens = torch.tensor([st.pending_tokens])                               # [1, n]
            positions = torch.arange(st.length, st.length + n).unsqueeze(0)
            hidden, st.kv = self.model(tokens, feats, positions, st.kv)
            st.length += n
            st.last_hidden = hidden[0, -1]
            st.pending_features, st.pending_tokens = [], []
        return st

    def _padded_past(self, states: list[_State]) -> tuple[KV, torch.Tensor, torch.Tensor]:
        """Right-padded past KV ``[B, Hkv*layers, Lmax, D]``, validity ``[B, Lmax]``, lengths ``[B]``."""
        lens = torch.tensor([s.length for s in states])
        l_max = int(lens.max())
        keys, values = [], []
        for s in states:
            pad = l_max - s.length
            keys.append(torch.nn.functional.pad(s.kv[0], (0, 0, 0, pad)))
            values.append(torch.nn.functional.pad(s.kv[1], (0, 0, 0, pad)))
        valid = torch.arange(l_max)[None, :] < lens[:, None]
        return (torch.cat(keys), torch.cat(values)), valid, lens

    def expand(self, states: list[_State], k: int, depth: int) -> Pool:
        """EAGLE-2 expansion for a batch of requests -> pool of ``k + depth * k * k`` nodes each."""
        model = self.model
        past, valid, lens = self._padded_past(states)
        h0 = torch.stack([s.last_hidden for s in states])                            # [B, H]
        batch = h0.shape[0]
        scores, idx = model.logits(h0).float().log_softmax(-1).topk(k, dim=-1)      # [B, k]
        tokens = model.to_target_ids(idx)                                            # [B, k]
        pool_tokens, pool_parents, pool_scores = [tokens], [torch.full((batch, k), -1)], [scores]
        frontier = torch.arange(k).expand(batch, k)                                  # pool index of inputs
        feats = h0.unsqueeze(1).expand(batch, k, h0.shape[-1])                       # [B, k, H]
        history = torch.zeros(batch, k, 0, dtype=torch.bool)                         # frontier ancestry
        eye = torch.eye(k, dtype=torch.bool).expand(batch, k, k)
        size = k
        for i in range(depth):
            tree_mask = torch.cat([history, eye], dim=-1)                            # [B, k, (i+1)k]
            mask = torch.cat([valid[:, None, :].expand(batch, k, -1), tree_mask], -1).unsqueeze(1)
            positions = (lens + i)[:, None].expand(batch, k)
            out, past = model(tokens, feats, positions, past, mask)                  # out [B, k, H]
            child_lp, child_idx = model.logits(out).float().log_softmax(-1).topk(k, dim=-1)  # [B, k, k]
            cumulative = (child_lp + scores[:, :, None]).flatten(1)                  # [B, k*k]
            pool_tokens.append(model.to_target_ids(child_idx).flatten(1))
            pool_parents.append(frontier.repeat_interleave(k, dim=1))
            pool_scores.append(cumulative)
            scores, sel = cumulative.topk(k, dim=-1)                                 # [B, k]
            parent_slot = sel // k
            frontier = size + sel
            size += k * k
            tokens = pool_tokens[-1].gather(1, sel)
            feats = out.gather(1, parent_slot[:, :, None].expand(-1, -1, out.shape[-1]))
            history = tree_mask.gather(1, parent_slot[:, :, None].expand(-1, -1, tree_mask.shape[-1]))
        return Pool(torch.cat(pool_tokens, 1), torch.cat(pool_parents, 1), torch.cat(pool_scores, 1))
