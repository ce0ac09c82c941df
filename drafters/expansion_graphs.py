"""CUDA graphs of the EAGLE expansion: one replay and one host read per drafting step.

Eagerly, an expansion is a few hundred small kernels (each depth: a drafter layer, its head, top-k, the
pool's gathers and the mask update), and on a GPU their launches, not their arithmetic, are the cost. A
graph needs fixed shapes and addresses, so the graphed expansion differs from the eager one in three ways
that leave every tree unchanged:

- the tree tokens' scratch columns are the last ``depth * k`` columns of a frozen ``DraftKV`` (fixed rows
  and capacity, never reallocated), not the columns after the batch's longest committed length; each
  query still sees its row's committed pairs (a mask from ``lengths``), its ancestors and itself;
- attention spans the whole capacity (masked), so the widths of every depth are fixed;
- all ``depth`` levels run: no ``PoolBuilder.settled`` host read, which only skips levels that cannot
  change the rerank (see ``settled``).

A graph per padded batch size (powers of two up to the frozen row count) is captured on first use. Its
inputs are the ``lengths`` ``[R]`` and last outputs ``[R, H]`` of rows ``0 .. R - 1``; rows past the
drafting batch compute on zeros and write only their own scratch columns. ``StaticExpansion.run``
without capture runs the same code eagerly (the CPU tests compare it with the dynamic path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drafters.draft_kv import DraftKV, KVBatch
from drafters.expansion import DraftContext, Pool, PoolBuilder


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
        return rows == list(range(len(rows))) and max(lengths) <= self.base and len(rows) <= self.kv.keys.shape[0]

    def bucket(self, n: int) -> int:
        return min(1 << (n - 1).bit_length(), self.kv.keys.shape[0])

    def run(self, lengths: torch.Tensor, last: torch.Tensor) -> Pool:
        """``lengths [n]``, ``last [n, H]`` of rows ``0 .. n - 1`` -> their candidate pool ``[n, P]``."""
        n = lengths.shape[0]
        g = self.graphs.get(self.bucket(n)) or self._build(self.bucket(n))
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
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):                                 # warm-up: allocator and kernels
                self._expand(g)
            torch.cuda.current_stream(device).wait_stream(side)
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph):
                g.pool = self._expand(g)
        self.graphs[rows] = g
        return g
