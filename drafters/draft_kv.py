"""Drafter KV cache: one preallocated buffer for all requests, a stable row per request.

``DraftKV`` holds keys and values ``[rows, layers * Hkv, capacity, D]`` on the drafter's device
(layer i owns heads ``[i * Hkv, (i + 1) * Hkv)``). A request owns one row; its committed
(feature, token) pairs fill columns ``[0, length)``. Columns after a batch's longest committed
length are scratch: a drafting step writes its tree tokens there and the next step overwrites
them. Rows stay dense (releasing a row moves the last row into the hole), so the usual batch,
every live request in row order, is a slice view of the buffer; any other batch is gathered
once per step (``KVBatch.gathered``) and its new context columns written back. Rows and
capacity grow by doubling. The buffers are inference tensors: every update runs in inference mode.

A forward writes its new keys and values through a cache object with one method,
``store(layer, k, v) -> (keys, values)`` (what the layer attends over): ``Slots`` writes into
a ``KVBatch`` in place, ``ConcatKV`` concatenates to a ``past`` tuple (training, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class KVStore(Protocol):
    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Keep a layer's new ``k``, ``v`` ``[B, Hkv, T, D]``; return the keys/values to attend over."""


def _grown(size: int, need: int) -> int:
    while size < need:
        size *= 2
    return size


class DraftKV:
    """Per-request drafter KV rows in one buffer; see the module docstring."""

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, rows: int = 4,
                 capacity: int = 256):
        shape = (rows, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)       # [R, layers * Hkv, C, D]
        self.values = torch.zeros(shape, dtype=dtype, device=device)     # [R, layers * Hkv, C, D]
        self.owners: list[str] = []                                      # request of each live row
        self.rows: dict[str, int] = {}
        self.frozen = False

    @torch.inference_mode()
    def freeze(self, rows: int, capacity: int) -> None:
        """Fix the buffers at ``rows`` x ``capacity`` for good (CUDA graphs hold their addresses)."""
        self._resize(rows, capacity)
        self.frozen = True

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @torch.inference_mode()
    def _resize(self, rows: int, capacity: int) -> None:
        if self.frozen:
            raise RuntimeError(f"the drafter KV is frozen at {tuple(self.keys.shape)}; {rows} rows x {capacity} "
                               "columns do not fit")
        r, c = min(rows, self.keys.shape[0]), min(capacity, self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1], capacity, old.shape[3])
            new[:r, :, :c] = old[:r, :, :c]
            setattr(self, name, new)

    def allocate(self, request_id: str) -> int:
        """The request's row (a new one at the end when it has none)."""
        if request_id not in self.rows:
            if len(self.owners) == self.keys.shape[0]:
                self._resize(2 * len(self.owners), self.capacity)
            self.rows[request_id] = len(self.owners)
            self.owners.append(request_id)
        return self.rows[request_id]

    @torch.inference_mode()
    def free(self, request_id: str) -> None:
        """Forget the request's row; the last row moves into it so live rows stay ``[0, n)``."""
        row = self.rows.pop(request_id, None)
        if row is None:
            return
        last = self.owners.pop()
        if last != request_id:
            self.keys[row], self.values[row] = self.keys[len(self.owners)], self.values[len(self.owners)]
            self.owners[row], self.rows[last] = last, row

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns in every row (committed plus scratch)."""
        if columns > self.capacity:
            self._resize(self.keys.shape[0], _grown(self.capacity, columns))

    def batch(self, request_ids: list[str], width: int) -> KVBatch:
        """The rows of ``request_ids`` (in that order) as a view when they are consecutive, else a gathered copy
        of their first ``width`` columns. ``width`` must already be reserved."""
        rows = [self.rows[r] for r in request_ids]
        first = rows[0]
        if rows == list(range(first, first + len(rows))):
            return KVBatch(self.keys[first:first + len(rows)], self.values[first:first + len(rows)])
        index = torch.tensor(rows, device=self.keys.device)
        return KVBatch(self.keys[index, :, :width], self.values[index, :, :width], index)

    @torch.inference_mode()
    def write_back(self, batch: KVBatch, columns: torch.Tensor) -> None:
        """Copy ``columns [B, n]`` of each row of a gathered batch into the buffer (no-op for a view)."""
        if batch.gathered is None:
            return
        rows = batch.gathered[:, None]                                           # [B, 1]
        local = torch.arange(len(batch.gathered), device=columns.device)[:, None]
        self.keys[rows, :, columns] = batch.keys[local, :, columns]
        self.values[rows, :, columns] = batch.values[local, :, columns]


@dataclass
class KVBatch:
    """Drafter KV rows of one drafting batch: ``[B, layers * Hkv, W, D]`` each."""

    keys: torch.Tensor
    values: torch.Tensor
    gathered: torch.Tensor | None = None   # [B] buffer rows when this is a copy; None when a view


@dataclass
class Slots:
    """Where one forward's new keys/values go in a ``KVBatch`` and how many columns its queries read.

    ``start``: first column written, the same for every row (int) or per row (``[B]``).
    """

    batch: KVBatch
    kv_heads: int
    start: int | torch.Tensor
    width: int

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """``k``, ``v`` ``[B, Hkv, T, D]`` -> this layer's keys and values ``[B, Hkv, width, D]``."""
        heads = slice(layer * self.kv_heads, (layer + 1) * self.kv_heads)
        keys, values = self.batch.keys[:, heads], self.batch.values[:, heads]
        t = k.shape[2]
        if isinstance(self.start, int):
            keys[:, :, self.start:self.start + t] = k
            values[:, :, self.start:self.start + t] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]                  # [B, 1]
            cols = self.start[:, None] + torch.arange(t, device=k.device)              # [B, T]
            keys[rows, :, cols] = k.transpose(1, 2)                                    # [B, T, Hkv, D]
            values[rows, :, cols] = v.transpose(1, 2)
        return keys[:, :, :self.width], values[:, :, :self.width]


class ConcatKV:
    """``past + new`` by concatenation (the training and reference path); ``result`` is the KV of every layer."""

    def __init__(self, past: KV | None, kv_heads: int):
        self.past, self.kv_heads = past, kv_heads
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        if self.past is not None:
            heads = slice(layer * self.kv_heads, (layer + 1) * self.kv_heads)
            k = torch.cat([self.past[0][:, heads], k], dim=2)                          # [B, Hkv, P + T, D]
            v = torch.cat([self.past[1][:, heads], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return k, v

    def result(self) -> KV:
        """Each ``[B, Hkv * layers, P + T, D]``."""
        return torch.cat(self.keys, dim=1), torch.cat(self.values, dim=1)
