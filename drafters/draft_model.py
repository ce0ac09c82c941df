"""Draft-model drafter: a small Llama-family model sharing the target's tokenizer drafts autoregressively.

The draft model is a ``server.models.llama.LlamaModel`` run through the attention backend of its device
(``kernels.get_backend``) over its own paged KV (``drafters.draft_model_kv``: single-slot pages, per-request
slot tables). Per request it keeps the KV of a prefix of the committed tokens (``_State.length``); each
step brings it up to date with the tokens committed since (the last accepted drafts and the new root) in
one batched causal forward for all requests, at most ``chunk`` tokens per request per forward; long
prompts are absorbed chunk by chunk from ``on_accept`` as they prefill. KV of draft nodes is written to
scratch slots after the committed length and never trusted afterwards: the next step's context pass
writes the committed tokens over them, so after verification the draft KV equals a fresh prefill of the
committed tokens.

Drafting (``propose``) is EAGLE-2's dynamic tree (docs/ALGORITHMS.md §2.2), batched across requests:
the root's top-k children, then up to ``depth`` forwards, each over the ``top_k`` frontier nodes of every
request (global score = sum of draft log-probs along the path; all ``top_k**2`` children enter the pool,
the best ``top_k`` become the next frontier), stopping once no deeper node can make the rerank, then the
rerank to each request's budget (``drafters.expansion.Pool.trees``). Drafts are deterministic top-k, so
verification uses q = 1 for greedy and sampled requests alike (lossless).

Node interface (for drafters that build their own trees or graphs, e.g. GSD), in one step:

- ``start(requests) -> list[Tensor [V] | None]``: the context pass; each request's log-probs of the
  token after its root (the last committed token), ``None`` when the draft KV has no room for it
  (draft nothing for that request). It opens the step: the requests' draft nodes are forgotten.
- ``forward_nodes(request_ids, tokens, parents) -> list[Tensor [n_i, V]]``: ONE batched forward over
  new draft nodes, ``tokens[i]`` / ``parents[i]`` for request ``request_ids[i]``; a request's nodes are
  numbered 0, 1, ... in call order across the calls of the step, and ``parents[i][j]`` is the number of
  an earlier node (of an earlier call or earlier in this list), or -1 for a child of the root. Each node
  attends to the committed context and its ancestors and sits at position ``committed + depth - 1``.
  Returns every node's log-probs of the next token (fp32). ``MemoryError`` when the draft KV has no
  scratch slot left (``start`` reserves ``scratch`` slots per request; more are taken as needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest
from drafters.draft_model_kv import SLOT, DraftModelKV
from drafters.expansion import PoolBuilder
from drafters.tree import DraftTree
from kernels import AttentionBackend, SeqAttention, get_backend
from server.models.llama import LlamaModel


@dataclass
class _State:
    tokens: list[int] = field(default_factory=list)   # committed tokens reported by on_accept
    length: int = 0                                   # leading tokens whose draft KV is in the request's slots


@dataclass
class _Step:
    """One request's draft nodes of the current step."""

    committed: int                                    # context length (root included) after the context pass
    context: list[int]                                # the context's slots
    paths: list[list[int]] = field(default_factory=list)   # per node: slots of its ancestors and itself


class DraftModelDrafter(Drafter):
    name = "draft-model"
    default_depth = 5

    def __init__(self, model: LlamaModel, kv: DraftModelKV, backend: AttentionBackend, max_tree_tokens: int = 16,
                 depth: int | None = None, top_k: int = 4, chunk: int = 128):
        self.model, self.kv, self.backend = model, kv, backend
        self.max_tree_tokens = max_tree_tokens
        self.depth, self.top_k, self.chunk = depth or self.default_depth, top_k, chunk
        self.device = next(model.parameters()).device
        self.states: dict[str, _State] = {}
        self.steps: dict[str, _Step] = {}

    @classmethod
    def create(cls, model: LlamaModel, kv_tokens: int, max_tree_tokens: int = 16, depth: int | None = None,
               top_k: int = 4, chunk: int = 128, backend: str | None = None) -> DraftModelDrafter:
        """The drafter with a ``kv_tokens``-slot draft KV in the model's dtype, on its device, through that device's
        attention backend (``backend`` forces one)."""
        weight = model.norm.weight
        kv = DraftModelKV(model.config, kv_tokens, weight.dtype, weight.device)
        return cls(model, kv, get_backend(SLOT, weight.device, backend), max_tree_tokens, depth, top_k, chunk)

    def tree_shape(self) -> tuple[int, int]:
        return self.depth, self.top_k

    @property
    def scratch(self) -> int:
        """Scratch slots ``start`` reserves per request: the nodes ``propose`` feeds at most."""
        return self.depth * self.top_k

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self.steps.pop(request_id, None)
        self.kv.free(request_id)

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        """Record the committed tokens; absorb a request's backlog once it reaches ``chunk`` (prefill chunks)."""
        backlog = []
        for u in updates:
            if u.reset or u.request_id not in self.states:
                self.release(u.request_id)
                self.states[u.request_id] = _State()
            st = self.states[u.request_id]
            if u.start > len(st.tokens):          # not aligned (no reset seen): ``propose`` catches up instead
                continue
            del st.tokens[u.start:]
            st.tokens.extend(u.fed_tokens)
            if len(st.tokens) - st.length >= self.chunk:
                backlog.append((u.request_id, st.tokens))
        if backlog:
            self._absorb(backlog, with_logprobs=False)

    @torch.inference_mode()
    def _absorb(self, items: list[tuple[str, list[int]]], with_logprobs: bool) -> list[torch.Tensor | None]:
        """Bring each request's draft KV up to all its ``tokens``, ``chunk`` tokens per request per forward;
        ``with_logprobs``: also the last token's next-token log-probs ``[V]`` (re-feeding it when nothing
        is new). A request whose slots (``scratch`` beyond its tokens) cannot be reserved is left as it was
        and gets ``None``."""
        out: list[torch.Tensor | None] = [None] * len(items)
        todo = []
        for i, (rid, tokens) in enumerate(items):
            st = self.states.setdefault(rid, _State())
            if with_logprobs:
                st.length = min(st.length, len(tokens) - 1)
            if self.kv.reserve(rid, len(tokens) + self.scratch):
                todo.append(i)
        while todo:
            seqs, ids, positions, last = [], [], [], []
            for i in todo:
                rid, tokens = items[i]
                st = self.states[rid]
                stop = min(len(tokens), st.length + self.chunk)
                seqs.append(SeqAttention(self.kv.table(rid), st.length, stop - st.length))
                ids.extend(tokens[st.length:stop])
                positions.extend(range(st.length, stop))
                st.length = stop
                last.append(len(ids) - 1)
            hidden = self._forward(ids, positions, seqs)                                     # [T, H]
            done = [j for j, i in enumerate(todo) if self.states[items[i][0]].length == len(items[i][1])]
            if with_logprobs and done:
                logp = self._logprobs(hidden[[last[j] for j in done]])                       # [n, V]
                for row, j in enumerate(done):
                    out[todo[j]] = logp[row]
            todo = [i for j, i in enumerate(todo) if j not in done]
        return out

    def _forward(self, ids: list[int], positions: list[int], seqs: list[SeqAttention]) -> torch.Tensor:
        """One draft-model forward: post-norm hidden ``[T, H]``."""
        cfg = self.model.config
        meta = self.backend.build_metadata(seqs)
        ids_t = torch.tensor(ids, device=self.device).clamp_(max=cfg.vocab_size - 1)       # [T]
        pos_t = torch.tensor(positions, device=self.device).clamp_(max=cfg.max_position_embeddings - 1)
        return self.model(ids_t, pos_t, self.kv.caches, meta, self.backend)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, H]`` -> next-token log-probs ``[n, V]`` (fp32)."""
        return self.model.compute_logits(hidden).float().log_softmax(-1)

    def start(self, requests: list[DraftRequest]) -> list[torch.Tensor | None]:
        """Open a drafting step: the context pass (see the module docstring)."""
        for r in requests:
            self.steps.pop(r.request_id, None)
        roots = self._absorb([(r.request_id, r.token_ids) for r in requests], with_logprobs=True)
        for r, root in zip(requests, roots):
            if root is not None:
                n = len(r.token_ids)
                self.steps[r.request_id] = _Step(n, self.kv.table(r.request_id)[:n])
        return roots

    @torch.inference_mode()
    def forward_nodes(self, request_ids: list[str], tokens: list[list[int]],
                      parents: list[list[int]]) -> list[torch.Tensor]:
        """One batched forward over new draft nodes (see the module docstring) -> log-probs ``[n_i, V]`` each."""
        seqs, ids, positions = [], [], []
        for rid, toks, pars in zip(request_ids, tokens, parents):
            step = self.steps[rid]
            if len(toks) != len(pars):
                raise ValueError(f"{rid}: {len(toks)} tokens but {len(pars)} parents")
            for tok, parent in zip(toks, pars):
                node = len(step.paths)
                if not -1 <= parent < node:
                    raise ValueError(f"{rid}: node {node} has parent {parent}; parents must be -1 or earlier nodes")
                if not self.kv.reserve(rid, step.committed + node + 1):
                    raise MemoryError(f"{rid}: the draft KV has no scratch slot for node {node}")
                path = (step.paths[parent] if parent >= 0 else []) + [self.kv.table(rid)[step.committed + node]]
                step.paths.append(path)
                seqs.append(SeqAttention(step.context + path, step.committed + len(path) - 1, 1))
                ids.append(tok)
                positions.append(step.committed + len(path) - 1)
        if not ids:
            return [torch.empty(0, self.model.config.vocab_size, device=self.device) for _ in request_ids]
        logp = self._logprobs(self._forward(ids, positions, seqs))                           # [T, V]
        return list(logp.split([len(t) for t in tokens]))

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        """Requests sharing a tree shape (top_k, depth) are expanded together after one context pass."""
        trees = [DraftTree.empty()] * len(requests)
        roots = self.start(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (r, root) in enumerate(zip(requests, roots)):
            if root is not None and r.budget > 0:
                shape = (min(r.params.draft_top_k or self.top_k, self.top_k),
                         min(r.params.draft_depth or self.depth, self.depth))
                groups.setdefault(shape, []).append(i)
        for (k, depth), members in groups.items():
            budgets = [min(requests[i].budget, self.max_tree_tokens) for i in members]
            rids = [requests[i].request_id for i in members]
            for i, tree in zip(members, self.expand(rids, torch.stack([roots[i] for i in members]), k, depth,
                                                     budgets)):
                trees[i] = tree
        return trees

    def expand(self, request_ids: list[str], roots: torch.Tensor, k: int, depth: int,
               budgets: list[int]) -> list[DraftTree]:
        """EAGLE-2 expansion from the roots' log-probs ``[B, V]`` through ``forward_nodes``, then the rerank."""
        pool = PoolBuilder(budgets, self.device)
        scores, tokens = roots.topk(k, dim=-1)                                                # [B, k]
        index = pool.add(tokens, torch.full_like(tokens, -1), scores)                         # [B, k] pool ids
        parents = np.full((len(request_ids), k), -1)                                          # [B, k] node ids
        for d in range(depth):
            if pool.settled(scores):
                break
            logp = torch.stack(self.forward_nodes(request_ids, tokens.tolist(), parents.tolist()))  # [B, k, V]
            child_lp, child_tok = logp.topk(k, dim=-1)                                        # [B, k, k]
            child_scores = (child_lp + scores[:, :, None]).flatten(1)                         # [B, k * k]
            children = pool.add(child_tok.flatten(1), index.repeat_interleave(k, dim=1), child_scores)
            scores, sel = child_scores.topk(k, dim=-1)                                        # [B, k]
            tokens, index = child_tok.flatten(1).gather(1, sel), children.gather(1, sel)
            parents = d * k + (sel // k).cpu().numpy()                                        # fed nodes d*k ..
        return pool.build().trees(budgets)
