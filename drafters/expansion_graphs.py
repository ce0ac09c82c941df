"""CUDA graphs of an EAGLE-family drafting step: the context pass and the expansion, one replay each.

Eagerly, a drafting step is a few hundred small kernels (the context pass over the newly committed pairs;
then per depth a drafter layer, its head, top-k, the pool's gathers and the mask update), and on a GPU
their launches, not their arithmetic, are the cost. A graph needs fixed shapes and addresses, so the
graphed step differs from the eager one in ways that leave every tree unchanged:

- the drafter KV is frozen (fixed rows and capacity, never reallocated), and the tree tokens' scratch
  columns are its last ``depth * k`` columns, not the columns after the batch's longest committed length;
- attention spans the whole capacity, masked: each query sees its row's committed pairs (from ``lengths``),
  then its own new pairs up to itself (context pass) or its ancestors and itself (expansion);
- the context pass takes a power-of-two number of pending pairs per row (at most the scratch width),
  zero-padded: padding pairs write only past the row's committed length, where nothing reads them;
- all ``depth`` levels run: no ``PoolBuilder.settled`` host read, which only skips levels that cannot
  change the rerank (see ``settled``).

Graphs are captured on first use per padded batch: rows ``0 .. R - 1`` (R a power of two up to the frozen
row count), which must be the drafting batch in order; rows past it compute on zeros and write only scratch
columns (their lengths point there). Without ``capture`` the same fixed-shape code runs eagerly (the CPU
tests compare it with the dynamic path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drafters.draft_kv import DraftKV, KVBatch
from drafters.expansion import DraftContext, Pool, PoolBuilder, gather_rows


def capture_graph(fn: Callable[[], torch.Tensor | Pool], device: torch.device):
    """``fn`` run once on a side stream (allocator and kernels warm), then captured: (graph, its outputs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def row_bucket(n: int, kv: DraftKV) -> int:
    """Rows of the graph for ``n`` drafting rows: the next power of two, at most the frozen row count."""
    return min(1 << (n - 1).bit_length(), kv.keys.shape[0])


def first_rows(rows: list[int], kv: DraftKV) -> bool:
    return rows == list(range(len(rows))) and len(rows) <= kv.keys.shape[0]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    lengths: torch.Tensor     # [R] committed pairs per row (input)
    last: torch.Tensor        # [R, H] drafter output at each row's last committed pair (input)
    pool: Pool                # [R, P] each (output)


class StaticExpansion:
    """The graphed expansion of one tree shape (``k``, ``depth``) over a frozen ``DraftKV``."""

    def __init__(self, expand: Callable[[DraftContext, int, int, PoolBuilder], Pool], kv: DraftKV, k: int,
                 depth: int, hidden: int, capture: bool):
        self.expand, self.kv, self.k, self.depth, self.hidden = expand, kv, k, depth, hidden
        self.capture = capture
        self.graphs: dict[int, _Graph] = {}

    @property
    def base(self) -> int:
        """First scratch column: the last ``depth * k`` columns of every row."""
        return self.kv.capacity - self.depth * self.k

    def fits(self, rows: list[int], lengths: list[int]) -> bool:
        """True when a batch is rows ``0 .. n - 1`` in order and its committed pairs stay below the scratch."""
        return first_rows(rows, self.kv) and max(lengths) <= self.base

    def run(self, lengths: torch.Tensor, last: torch.Tensor) -> Pool:
        """``lengths [n]``, ``last [n, H]`` of rows ``0 .. n - 1`` -> their candidate pool ``[n, P]``."""
        n = lengths.shape[0]
        rows = row_bucket(n, self.kv)
        g = self.graphs.get(rows) or self._build(rows)
        g.lengths[:n].copy_(lengths)
        g.lengths[n:].zero_()
        g.last[:n].copy_(last)
        g.last[n:].zero_()
        if g.graph is None:
            g.pool = self._expand(g)
        else:
            g.graph.replay()
        return Pool(g.pool.tokens[:n], g.pool.parents[:n], g.pool.scores[:n])

    def _expand(self, g: _Graph) -> Pool:
        rows = g.lengths.shape[0]
        ctx = DraftContext(KVBatch(self.kv.keys[:rows], self.kv.values[:rows]), g.lengths, self.base, g.last)
        return self.expand(ctx, self.k, self.depth, PoolBuilder([0] * rows, g.lengths.device, early_stop=False))

    def _build(self, rows: int) -> _Graph:
        device, dtype = self.kv.keys.device, self.kv.keys.dtype
        g = _Graph(None, torch.zeros(rows, dtype=torch.long, device=device),
                   torch.zeros(rows, self.hidden, dtype=dtype, device=device), None)
        if self.capture:
            g.graph, g.pool = capture_graph(lambda: self._expand(g), device)
        self.graphs[rows] = g
        return g


@dataclass
class _ContextGraph:
    graph: torch.cuda.CUDAGraph | None
    tokens: torch.Tensor      # [R, N] pending tokens, zero-padded (input)
    feats: torch.Tensor       # [R, N, H] their target features (input)
    lengths: torch.Tensor     # [R] committed pairs before them (input; padding rows: the scratch)
    last_index: torch.Tensor  # [R] index of each row's last real pair (input)
    last: torch.Tensor | None  # [R, H] the drafter output there (output)


class StaticContext:
    """The graphed context pass over a frozen ``DraftKV`` with ``scratch`` columns at the end of every row.

    ``forward`` is the drafter's ``context_forward``."""

    def __init__(self, forward: Callable[..., tuple[torch.Tensor, torch.Tensor]], kv: DraftKV, hidden: int,
                 scratch: int, capture: bool):
        self.forward, self.kv, self.hidden, self.scratch, self.capture = forward, kv, hidden, scratch, capture
        self.graphs: dict[tuple[int, int], _ContextGraph] = {}

    def shape(self, n: int, new: int) -> tuple[int, int] | None:
        """(rows, pending pairs per row) of the graph for ``n`` rows of up to ``new`` pairs, or None (eager)."""
        width = 1 << (new - 1).bit_length()
        return (row_bucket(n, self.kv), width) if width <= self.scratch else None

    def fits(self, rows: list[int], new: int) -> bool:
        return first_rows(rows, self.kv) and self.shape(len(rows), new) is not None

    def run(self, tokens: torch.Tensor, feats: torch.Tensor, lengths: torch.Tensor,
            last_index: torch.Tensor) -> torch.Tensor:
        """Padded ``tokens [R, N]``, ``feats [R, N, F]`` and the batch's ``lengths [n]``, ``last_index [n]`` ->
        the drafter output at each row's last pending pair ``[n, H]`` (a copy: the next replay overwrites)."""
        (rows, new), n = tokens.shape, lengths.shape[0]
        g = self.graphs.get((rows, new)) or self._build(rows, new)
        g.tokens.copy_(tokens)
        g.feats.copy_(feats)
        g.lengths.fill_(self.kv.capacity - new)
        g.lengths[:n].copy_(lengths)
        g.last_index.zero_()
        g.last_index[:n].copy_(last_index)
        if g.graph is None:
            g.last = self._forward(g)
        else:
            g.graph.replay()
        return g.last[:n].clone()

    def _forward(self, g: _ContextGraph) -> torch.Tensor:
        rows = g.tokens.shape[0]
        batch = KVBatch(self.kv.keys[:rows], self.kv.values[:rows])
        hidden, _ = self.forward(batch, g.tokens, g.feats, g.lengths, self.kv.capacity, g.lengths, masked=True)
        return gather_rows(hidden, g.last_index[:, None])[:, 0]                          # [R, H]

    def _build(self, rows: int, new: int) -> _ContextGraph:
        device, dtype = self.kv.keys.device, self.kv.keys.dtype
        g = _ContextGraph(None, torch.zeros(rows, new, dtype=torch.long, device=device),
                          torch.zeros(rows, new, self.hidden, dtype=dtype, device=device),
                          torch.full((rows,), self.kv.capacity - new, dtype=torch.long, device=device),
                          torch.zeros(rows, dtype=torch.long, device=device), None)
        if self.capture:
            g.graph, g.last = capture_graph(lambda: self._forward(g), device)
        self.graphs[(rows, new)] = g
        return g
