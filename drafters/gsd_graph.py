"""The token graph of one request's GSD drafting round (torch-free; docs/ALGORITHMS.md §6).

Node 0 is the root (the last committed token). Step ``s`` feeds the nodes created at step ``s - 1`` (step 1
feeds the root) to the draft model and hands :meth:`TokenGraph.expand` each fed node's candidates, most likely
first. A candidate is kept if its probability is at least ``sibling_threshold`` times its best sibling's; it
is a *leaf* if it is below ``prob_threshold`` or its parent is a leaf (leaves are still fed: the flag only
ends drafting). Before a kept candidate becomes a node, merging (``repeat_threshold`` r >= 0) looks for an
existing node of the same token whose r preceding tokens match the parent's chain and which cannot reach the
parent (so no path revisits a node); if found, the parent gets an edge to it (a *pseudo-child*) instead of a
new node, and the merged continuation is never drafted again.

Every node's real depth is the step that created it, and a merge target was created at the current step or
earlier, so a pseudo-child's subtree is already drafted as deep as the un-merged copy would be by the time it
is needed. Unrolling the DAG to depth ``steps`` therefore gives exactly the un-merged tree whenever the draft
model's next-token distribution depends only on the last r + 1 tokens (GSD's approximation otherwise; it only
changes what is drafted, never what verification accepts). Drafting stops when no step-``s`` node of the
unrolled tree is a non-leaf (GSD's "the step added only leaves", with pseudo-children counted as their
unrolled copies), at ``max_steps``, or once ``max_nodes`` nodes exist (the cap is the one rule merging
changes: a merged graph reaches it later).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from drafters.gsd_config import GsdConfig
from drafters.tree import DraftTree

Candidates = Sequence[tuple[int, float]]   # (token, probability), most likely first


@dataclass(frozen=True)
class Edge:
    node: int          # the child's graph node
    prob: float        # the child's token probability under the parent
    logp: float        # log(prob)
    rank: int          # the token's rank among the parent's candidates (0 = most likely)
    pseudo: bool       # a merge into an existing node (no new node, no draft forward)


@dataclass
class Node:
    token: int
    parent: int        # -1 for the root
    depth: int         # real depth: the step that created the node (root 0)
    score: float       # log joint probability along the real path
    leaf: bool
    edges: list[Edge] = field(default_factory=list)


class TokenGraph:
    """One request's drafting DAG: feed :attr:`pending`, pass their candidates to :meth:`expand`, repeat
    until :attr:`done`, then :meth:`unroll` to the verify budget."""

    def __init__(self, root_token: int, config: GsdConfig):
        self.config = config
        self.nodes = [Node(root_token, -1, 0, 0.0, False)]
        self.by_token: dict[int, list[int]] = {}
        self.pending: list[int] = [0]     # nodes whose candidates the next expand call takes
        self.steps = 0
        self.strong = {0}                 # nodes ending an all-non-leaf unrolled path of length ``steps``
        self.stop_reason: str | None = None
        self.calls = 0                    # steps that fed at least one node (batched draft forwards)
        self.fed = 0                      # nodes fed to the draft model (root included)
        self.merges = 0                   # pseudo-child edges

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def drafted(self) -> int:
        """Nodes created (root excluded)."""
        return len(self.nodes) - 1

    def expand(self, candidates: Sequence[Candidates]) -> list[int]:
        """One draft step: ``candidates[i]`` are pending node ``i``'s. Returns the new pending nodes (those
        the draft model must see next step; empty once done, or when every candidate merged)."""
        if self.done:
            raise RuntimeError("expand after the graph stopped")
        if len(candidates) != len(self.pending):
            raise ValueError(f"{len(candidates)} candidate lists for {len(self.pending)} pending nodes")
        self.calls += bool(self.pending)
        self.fed += len(self.pending)
        new: list[int] = []
        capped = False
        for parent, cands in zip(self.pending, candidates):
            for rank, token, p in self.kept(cands):
                if self.merge(parent, token, p, rank):
                    continue
                if self.drafted >= self.config.max_nodes:
                    capped = True
                    break
                new.append(self.add(parent, token, p, rank))
        self.steps += 1
        threshold = self.config.prob_threshold
        self.strong = {e.node for v in self.strong for e in self.nodes[v].edges if e.prob >= threshold}
        if not self.strong:
            self.stop_reason = "leaves"
        elif self.steps >= self.config.max_steps:
            self.stop_reason = "max_steps"
        elif capped or self.drafted >= self.config.max_nodes:
            self.stop_reason = "max_nodes"
        self.pending = [] if self.done else new
        return list(self.pending)

    def halt(self, reason: str) -> None:
        """Stop drafting now (e.g. the draft KV is full); the graph unrolls as it stands."""
        self.stop_reason, self.pending = reason, []

    def kept(self, cands: Candidates) -> list[tuple[int, int, float]]:
        """(rank, token, prob) of the top-n candidates passing the sibling threshold (and p > 0)."""
        top = list(cands)[:self.config.top_n]
        if not top:
            return []
        best = max(p for _, p in top)
        floor = self.config.sibling_threshold * best
        return [(rank, int(t), float(p)) for rank, (t, p) in enumerate(top) if p > 0 and p >= floor]

    def add(self, parent: int, token: int, p: float, rank: int) -> int:
        up = self.nodes[parent]
        logp = math.log(p)
        i = len(self.nodes)
        self.nodes.append(Node(token, parent, up.depth + 1, up.score + logp,
                               up.leaf or p < self.config.prob_threshold))
        up.edges.append(Edge(i, p, logp, rank, False))
        self.by_token.setdefault(token, []).append(i)
        return i

    def merge(self, parent: int, token: int, p: float, rank: int) -> bool:
        """Add a pseudo-child edge ``parent -> x`` to the first node ``x`` that qualifies; False if none."""
        if self.config.repeat_threshold < 0:
            return False
        for x in self.by_token.get(token, []):
            if self.preceding_match(parent, self.nodes[x].parent) and not self.reaches(x, parent):
                self.nodes[parent].edges.append(Edge(x, p, math.log(p), rank, True))
                self.merges += 1
                return True
        return False

    def preceding_match(self, a: int, b: int) -> bool:
        """The ``repeat_threshold`` tokens ending at nodes ``a`` and ``b`` (walking up) exist and agree."""
        for _ in range(self.config.repeat_threshold):
            if a < 0 or b < 0 or self.nodes[a].token != self.nodes[b].token:
                return False
            a, b = self.nodes[a].parent, self.nodes[b].parent
        return True

    def reaches(self, start: int, target: int) -> bool:
        """Whether ``target`` is ``start`` or lies below it (real or pseudo edges)."""
        seen, stack = {start}, [start]
        while stack:
            v = stack.pop()
            if v == target:
                return True
            for e in self.nodes[v].edges:
                if e.node not in seen:
                    seen.add(e.node)
                    stack.append(e.node)
        return False

    def unrolled_sizes(self) -> list[int]:
        """Nodes of the unrolled tree at each depth ``0 .. steps`` (the root is depth 0)."""
        level = {0: 1}                    # graph node -> unrolled copies at this depth
        sizes = [1]
        for _ in range(self.steps):
            nxt: dict[int, int] = {}
            for v, count in level.items():
                for e in self.nodes[v].edges:
                    nxt[e.node] = nxt.get(e.node, 0) + count
            level = nxt
            sizes.append(sum(level.values()))
        return sizes

    def unmerged_fed(self) -> int:
        """Nodes the un-merged tree would have fed for the same unrolled tree (one per unrolled node above the
        last depth): :attr:`fed` without merging, exactly so when merging is exact (see the module doc)."""
        return sum(self.unrolled_sizes()[:self.steps])

    def unroll(self, budget: int | None = None) -> DraftTree:
        """The DAG unrolled into a tree down to depth ``steps`` (each pseudo-child re-expands the merged node's
        subtree under its new parent; score = parent score + edge log-prob), cut to the ``budget`` best nodes.

        Nodes are ranked by descending score, ties by the canonical order (depth, then the candidate ranks along
        the path): the order of ``drafters.tree.select_nodes`` over the full unrolled tree listed canonically,
        which is ancestor-closed here because scores never increase along a path. The result is listed in
        canonical order (parents before children).
        """
        limit = math.inf if budget is None else budget
        heap: list[tuple[float, int, tuple[int, ...], int, int]] = []  # (-score, depth, ranks, node, parent slot)
        picked: list[tuple[tuple[int, ...], int, int, float]] = []     # (ranks, node, parent slot, score)

        def push(v: int, ranks: tuple[int, ...], slot: int, score: float) -> None:
            if len(ranks) < self.steps:
                for e in self.nodes[v].edges:
                    child = ranks + (e.rank,)
                    heapq.heappush(heap, (-(score + e.logp), len(child), child, e.node, slot))

        push(0, (), -1, 0.0)
        while heap and len(picked) < limit:
            neg, _, ranks, v, slot = heapq.heappop(heap)
            picked.append((ranks, v, slot, -neg))
            push(v, ranks, len(picked) - 1, -neg)
        order = sorted(range(len(picked)), key=lambda i: (len(picked[i][0]), picked[i][0]))
        index = {slot: i for i, slot in enumerate(order)}
        index[-1] = -1
        return DraftTree(tuple(self.nodes[picked[i][1]].token for i in order),
                         tuple(index[picked[i][2]] for i in order),
                         tuple(picked[i][3] for i in order))
