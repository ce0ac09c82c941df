"""GSD drafter: graph-structured speculative decoding (docs/ALGORITHMS.md §6) over a node-forward drafter.

Per step, for all requests at once: the inner drafter's context pass gives each root's next-token
distribution; then every round feeds the new nodes of every request's token graph (``drafters.gsd_graph``)
to the draft model in ONE batched ``forward_nodes`` call, and each graph takes its nodes' top-n candidates
(sibling and probability thresholds, DAG merging), until every graph stops. Each graph is unrolled to its
request's verify budget. A merged candidate re-uses the existing node's drafted continuation, computed under
a different ancestor path inside the draft model (GSD's approximation, which only changes what is drafted);
the target verifies the unrolled tree with its own tree mask and positions, and only the accepted path's KV
is kept. Drafts are deterministic top-n, so verification is the project's exact one with q = 1 for greedy
and sampled requests alike (GSD's own stochastic DFS is not distribution-preserving).

The GSD drafter owns the inner drafter (the draft-model drafter) and delegates the committed-context
bookkeeping (``on_accept``, ``release``, ``bind``) to it.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch

from drafters.base import AcceptUpdate, Drafter, DraftRequest, TargetAccess
from drafters.gsd_config import GsdConfig
from drafters.gsd_graph import Candidates, TokenGraph
from drafters.tree import DraftTree


class NodeForward(Protocol):
    """What GSD needs of its inner drafter (``drafters.draft_model.DraftModelDrafter``'s node interface)."""

    max_tree_tokens: int
    states: dict

    def start(self, requests: list[DraftRequest]) -> list[torch.Tensor | None]: ...   # [V] root log-probs

    def forward_nodes(self, request_ids: list[str], tokens: list[list[int]],
                      parents: list[list[int]]) -> list[torch.Tensor]: ...              # [n_i, V] log-probs each

    def on_accept(self, updates: list[AcceptUpdate]) -> None: ...

    def release(self, request_id: str) -> None: ...

    def bind(self, target: TargetAccess) -> None: ...


def top_candidates(logprobs: torch.Tensor, n: int) -> list[Candidates]:
    """``[T, V]`` log-probs -> per row its ``n`` most likely (token, prob), one host transfer."""
    values, tokens = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)                  # [T, n]
    probs = values.float().exp().cpu().tolist()
    return [list(zip(t, p)) for t, p in zip(tokens.cpu().tolist(), probs)]


class GsdDrafter(Drafter):
    name = "gsd"

    def __init__(self, inner: NodeForward, config: GsdConfig):
        self.inner, self.config = inner, config
        self.max_tree_tokens = inner.max_tree_tokens
        self.totals: Counter[str] = Counter()
        self.configs: dict[tuple[int, int], GsdConfig] = {}

    @property
    def states(self) -> dict:
        return self.inner.states

    def tree_shape(self) -> tuple[int, int]:
        return self.config.max_steps, self.config.top_n

    def bind(self, target: TargetAccess) -> None:
        self.inner.bind(target)

    def on_accept(self, updates: list[AcceptUpdate]) -> None:
        self.inner.on_accept(updates)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def request_config(self, r: DraftRequest) -> GsdConfig:
        """The server's options with the request's depth / top-k overrides (never above the server's)."""
        steps = min(r.params.draft_depth or self.config.max_steps, self.config.max_steps)
        top_n = min(r.params.draft_top_k or self.config.top_n, self.config.top_n)
        key = (steps, top_n)
        if key not in self.configs:
            self.configs[key] = self.config.model_copy(update={"max_steps": steps, "top_n": top_n})
        return self.configs[key]

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[DraftTree]:
        asks = [r for r in requests if r.budget > 0]
        graphs: dict[str, TokenGraph] = {}
        roots = self.inner.start(asks) if asks else []
        live = [(r, root) for r, root in zip(asks, roots) if root is not None]
        if live:
            cands = top_candidates(torch.stack([root for _, root in live]), self.config.top_n)  # roots [B, V]
            for (r, _), c in zip(live, cands):
                graphs[r.request_id] = TokenGraph(r.token_ids[-1], self.request_config(r))
                graphs[r.request_id].expand([c])
        self.draft(graphs)
        for g in graphs.values():
            self.count(g)
        return [graphs[r.request_id].unroll(min(r.budget, self.max_tree_tokens)) if r.request_id in graphs
                else DraftTree.empty() for r in requests]

    def draft(self, graphs: dict[str, TokenGraph]) -> None:
        """Feed every graph's new nodes in one batched forward per round until all graphs stop."""
        while active := {rid: g for rid, g in graphs.items() if not g.done}:
            feeding = [rid for rid, g in active.items() if g.pending]
            cands: dict[str, list[Candidates]] = {rid: [] for rid in active}
            if feeding:
                try:
                    logp = self.inner.forward_nodes(
                        feeding, [[active[rid].nodes[v].token for v in active[rid].pending] for rid in feeding],
                        [[active[rid].nodes[v].parent - 1 for v in active[rid].pending] for rid in feeding])
                except MemoryError:
                    for g in active.values():
                        g.halt("draft_kv_full")
                    return
                self.totals["forward_calls"] += 1
                rows = top_candidates(torch.cat(logp), self.config.top_n)                  # from [sum n_i, V]
                offset = 0
                for rid in feeding:
                    n = len(active[rid].pending)
                    cands[rid], offset = rows[offset:offset + n], offset + n
            for rid, g in active.items():
                g.expand(cands[rid])

    def count(self, g: TokenGraph) -> None:
        self.totals.update({"rounds": 1, "steps": g.steps, "draft_forwards": g.calls, "nodes_fed": g.fed,
                            "unmerged_draft_forwards": g.steps, "unmerged_nodes_fed": g.unmerged_fed(),
                            "merges": g.merges, "drafted": g.drafted, f"stop_{g.stop_reason}": 1})

    def bench_report(self) -> dict:
        """Totals over all drafting rounds (one per request per verify step) and their per-round means: nodes
        fed to the draft model and forwards with merging, and what the un-merged graph would have needed for
        the same unrolled tree (the drafter forwards saved by merging)."""
        rounds = max(self.totals["rounds"], 1)
        per_round = {k: v / rounds for k, v in self.totals.items() if k != "rounds"}
        saved = 1 - self.totals["nodes_fed"] / max(self.totals["unmerged_nodes_fed"], 1)
        return {"config": self.config.model_dump(), "totals": dict(self.totals), "per_round": per_round,
                "nodes_fed_saved_by_merging": saved}
