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


class PoolBuilder:
    """Appends ``[B, n]`` groups of candidate nodes; ``add`` returns their pool indices ``[B, n]``."""

    def __init__(self):
        self.tokens: list[torch.Tensor] = []
        self.parents: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.size = 0

    def add(self, tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tokens.append(tokens)
        self.parents.append(parents)
        self.scores.append(scores)
        first, self.size = self.size, self.size + tokens.shape[1]
        return torch.arange(first, self.size).expand(tokens.shape[0], -1)

    def build(self) -> Pool:
        return Pool(torch.cat(self.tokens, 1), torch.cat(self.parents, 1), torch.cat(self.scores, 1))


@dataclass
class Beam:
    """The ``k`` frontier nodes of every request after the serial (autoregressive) steps."""

    tokens: torch.Tensor          # [B, k] target token ids
    feats: torch.Tensor           # [B, k, H] drafter output that predicted each token
    scores: torch.Tensor          # [B, k] cumulative log-prob
    nodes: torch.Tensor           # [B, k] pool index
    prev_tokens: torch.Tensor     # [B, k] the parent's token and feature (the root's: its own)
    prev_feats: torch.Tensor      # [B, k, H]


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, n, ...]`` gathered at ``index [B, m]`` along dim 1 -> ``[B, m, ...]``."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


class EagleTreeDrafter(Drafter):
    name = "eagle"
    default_depth = 5

    def __init__(self, model: EagleDrafter, total_tokens: int = 16, depth: int | None = None, top_k: int = 4):
        self.model = model
        self.max_tree_tokens = total_tokens
        self.depth, self.top_k = depth or self.default_depth, top_k
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
        pool = PoolBuilder()
        self.serial(states, k, depth, pool, all_children=True)
        return pool.build()

    def serial(self, states: list[_State], k: int, steps: int, pool: PoolBuilder, all_children: bool) -> Beam:
        """Depth 1 (top ``k`` of each request's last drafter output), then ``steps`` batched drafter
        forwards on the ``k`` frontier nodes. Each forward scores ``k * k`` children; the best ``k`` by
        cumulative log-prob form the next frontier. ``all_children``: every child enters the pool
        (EAGLE-2), else only the survivors (Gumiho)."""
        model = self.model
        past, valid, lens = self._padded_past(states)
        h0 = torch.stack([s.last_hidden for s in states])                            # [B, H]
        batch = h0.shape[0]
        scores, idx = model.logits(h0).float().log_softmax(-1).topk(k, dim=-1)      # [B, k]
        tokens = model.to_target_ids(idx)                                            # [B, k]
        nodes = pool.add(tokens, torch.full((batch, k), -1), scores)                 # [B, k]
        feats = h0.unsqueeze(1).expand(batch, k, h0.shape[-1])                       # [B, k, H]
        prev_tokens, prev_feats = tokens, feats
        history = torch.zeros(batch, k, 0, dtype=torch.bool)                         # frontier ancestry
        eye = torch.eye(k, dtype=torch.bool).expand(batch, k, k)
        for i in range(steps):
            tree_mask = torch.cat([history, eye], dim=-1)                            # [B, k, (i+1)k]
            mask = torch.cat([valid[:, None, :].expand(batch, k, -1), tree_mask], -1).unsqueeze(1)
            positions = (lens + i)[:, None].expand(batch, k)
            out, past = model(tokens, feats, positions, past, mask)                  # out [B, k, H]
            child_lp, child_idx = model.logits(out).float().log_softmax(-1).topk(k, dim=-1)  # [B, k, k]
            cumulative = (child_lp + scores[:, :, None]).flatten(1)                  # [B, k*k]
            children = model.to_target_ids(child_idx).flatten(1)                     # [B, k*k]
            scores, sel = cumulative.topk(k, dim=-1)                                 # [B, k]
            parent_slot = sel // k
            if all_children:
                child_nodes = pool.add(children, nodes.repeat_interleave(k, dim=1), cumulative)
                nodes = child_nodes.gather(1, sel)
            else:
                nodes = pool.add(children.gather(1, sel), nodes.gather(1, parent_slot), scores)
            prev_tokens, prev_feats = tokens.gather(1, parent_slot), _rows(feats, parent_slot)
            tokens, feats = children.gather(1, sel), _rows(out, parent_slot)
            history = _rows(tree_mask, parent_slot)
        return Beam(tokens, feats, scores, nodes, prev_tokens, prev_feats)
