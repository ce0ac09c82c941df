"""Backend-neutral, ragged attention metadata for one forward over a batch of sequences.

Every sequence contributes ``num_new`` query tokens that sit at KV positions
``prefix_len .. prefix_len + num_new - 1`` of its block table (for a draft tree these
are the lookahead slots). A query attends to the whole committed prefix and to the new
tokens its mask allows: causal for prefill chunks and decodes, the ancestor mask for
draft-tree tokens. Nothing is padded to the longest query of the batch: queries are
addressed by cumulative query lengths, context by block tables, tree masks are bit-packed.

``MetadataBuilder`` fills persistent device buffers (grown when a batch outgrows them,
otherwise reused step after step, so their addresses are stable for CUDA graphs) from
host staging arrays in one copy per field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

MASK_WORD_BITS = 32


@dataclass
class SeqAttention:
    """One sequence's share of a forward pass (torch-free description)."""

    block_table: list[int]
    prefix_len: int                       # KV entries already committed before this pass
    num_new: int                          # query tokens in this pass
    tree_mask: np.ndarray | None = None   # [num_new, num_new] bool ancestor-or-self; None = causal


@dataclass
class AttentionMetadata:
    """Ragged metadata of one forward, shared by all layers; tensors live on the model's device.

    Query token ``t`` of sequence ``b`` (``cu_seqlens_q[b] <= t < cu_seqlens_q[b + 1]``, local index
    ``i = t - cu_seqlens_q[b]``) sits at position ``prefix_lens[b] + i`` and may attend to context
    position ``j`` when ``j < prefix_lens[b]``, or when ``j = prefix_lens[b] + c`` and
    ``c <= i`` (causal, ``is_tree[b] == 0``) or bit ``c % 32`` of ``tree_masks[t, c // 32]`` is set
    (``is_tree[b] == 1``).
    """

    slot_mapping: torch.Tensor   # [T] int64 flat KV slot (block * block_size + offset) written by each new token
    cu_seqlens_q: torch.Tensor   # [B + 1] int32 start of each sequence's queries among the T new tokens
    seq_lens: torch.Tensor       # [B] int32 context length after this pass (prefix_len + num_new)
    prefix_lens: torch.Tensor    # [B] int32 committed KV entries before this pass
    block_tables: torch.Tensor   # [B, max_blocks] int32 block ids (padding 0)
    is_tree: torch.Tensor        # [B] int32 1: the new tokens use tree_masks, 0: causal
    tree_masks: torch.Tensor     # [T, W] int32 bit-packed visibility of the sequence's new tokens (W >= 1)
    block_size: int
    seqs: list[SeqAttention]     # the host description (for backends that work on the host)
    backend_data: Any = None     # what a backend derives once per step for all layers (e.g. padded gathers)

    @property
    def query_lens(self) -> list[int]:
        return [s.num_new for s in self.seqs]

    @property
    def context_lens(self) -> list[int]:
        return [s.prefix_len + s.num_new for s in self.seqs]

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_seq_len(self) -> int:
        return max(self.context_lens)


@dataclass(frozen=True)
class Padding:
    """Fixed shapes for a captured (CUDA graph) forward: ``seqs`` sequences and ``tokens`` tokens in all,
    the real ones first; padded sequences have no queries and no context, padded tokens write their
    (ignored) keys and values to ``scratch_slot``."""

    seqs: int
    tokens: int
    mask_words: int
    table_width: int
    scratch_slot: int


def slots_for(block_table: list[int], start: int, stop: int, block_size: int) -> np.ndarray:
    """Flat KV slots of positions [start, stop) of a sequence: int64 [stop - start]."""
    pos = np.arange(start, stop, dtype=np.int64)
    blocks = np.asarray(block_table, dtype=np.int64)[pos // block_size]
    return blocks * block_size + pos % block_size


def pack_mask_rows(mask: np.ndarray, words: int) -> np.ndarray:
    """``[n, m]`` bool -> ``[n, words]`` int32, bit ``c % 32`` of word ``c // 32`` = column ``c``."""
    padded = np.zeros((mask.shape[0], words * MASK_WORD_BITS), dtype=bool)
    padded[:, :mask.shape[1]] = mask
    return np.packbits(padded, axis=1, bitorder="little").view("<i4").reshape(mask.shape[0], words)


def unpack_mask_rows(packed: np.ndarray, columns: int) -> np.ndarray:
    """Inverse of :func:`pack_mask_rows`: ``[n, words]`` int32 -> ``[n, columns]`` bool."""
    bits = np.unpackbits(np.ascontiguousarray(packed, dtype="<i4").view(np.uint8), axis=1, bitorder="little")
    return bits[:, :columns].astype(bool)


class MetadataBuilder:
    """Turns per-sequence descriptions into :class:`AttentionMetadata` in persistent device buffers."""

    FIELDS: ClassVar[dict[str, torch.dtype]] = {"slot_mapping": torch.int64, "cu_seqlens_q": torch.int32, "seq_lens": torch.int32,
              "prefix_lens": torch.int32, "block_tables": torch.int32, "is_tree": torch.int32,
              "tree_masks": torch.int32}

    def __init__(self, block_size: int, device: torch.device | str = "cpu"):
        self.block_size = block_size
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A leading-corner view ``shape`` of the persistent buffer ``name``, regrown (doubling the outgrown
        dimensions) when too small. A 2-D view keeps the buffer's row stride, so it may be non-contiguous."""
        buf = self.buffers.get(name)
        if buf is None or any(n > c for n, c in zip(shape, buf.shape)):
            old = buf.shape if buf is not None else (0,) * len(shape)
            cap = tuple(max(n, 2 * c, 16) if n > c else c for n, c in zip(shape, old))
            buf = self.buffers[name] = torch.zeros(cap, dtype=self.FIELDS[name], device=self.device)
        return buf[tuple(slice(0, n) for n in shape)]

    def _put(self, name: str, host: np.ndarray) -> torch.Tensor:
        view = self._buffer(name, host.shape)
        view.copy_(torch.from_numpy(host), non_blocking=self.device.type == "cuda")
        return view

    def build(self, seqs: list[SeqAttention], pad: Padding | None = None) -> AttentionMetadata:
        """Metadata for ``seqs``; with ``pad``, in exactly the padded shapes (``ValueError`` if they do not fit)."""
        if not seqs:
            raise ValueError("a forward needs at least one sequence")
        q_lens = np.array([s.num_new for s in seqs], dtype=np.int64)
        prefix = np.array([s.prefix_len for s in seqs], dtype=np.int64)
        ctx = prefix + q_lens
        num_tokens = int(q_lens.sum())
        max_blocks = max(1, -(-int(ctx.max()) // self.block_size))
        tree_sizes = [s.num_new for s in seqs if s.tree_mask is not None]
        words = max(1, -(-max(tree_sizes, default=1) // MASK_WORD_BITS))
        rows, width, total = len(seqs), max_blocks, num_tokens
        if pad is not None:
            if rows > pad.seqs or total > pad.tokens or words > pad.mask_words or width > pad.table_width:
                raise ValueError(f"batch ({rows} seqs, {total} tokens, {words} mask words, {width} blocks) "
                                 f"does not fit {pad}")
            rows, width, total, words = pad.seqs, pad.table_width, pad.tokens, pad.mask_words
            prefix = np.pad(prefix, (0, rows - len(seqs)))
            ctx = np.pad(ctx, (0, rows - len(seqs)))
        cu = np.full(rows + 1, num_tokens, dtype=np.int32)
        cu[0] = 0
        np.cumsum(q_lens, out=cu[1:len(seqs) + 1])
        tables = np.zeros((rows, width), dtype=np.int32)
        slots = []
        masks = np.zeros((total, words), dtype=np.int32)
        for b, s in enumerate(seqs):
            used = -(-int(ctx[b]) // self.block_size)
            if len(s.block_table) < used:
                raise ValueError(f"sequence {b}: block table covers {len(s.block_table)} blocks, needs {used}")
            tables[b, :used] = s.block_table[:used]
            slots.append(slots_for(s.block_table, int(prefix[b]), int(ctx[b]), self.block_size))
            if s.tree_mask is not None:
                if s.tree_mask.shape != (s.num_new, s.num_new):
                    raise ValueError(f"sequence {b}: tree mask {s.tree_mask.shape} for {s.num_new} new tokens")
                masks[cu[b]:cu[b + 1]] = pack_mask_rows(s.tree_mask, words)
        if pad is not None:
            slots.append(np.full(total - num_tokens, pad.scratch_slot, dtype=np.int64))
        is_tree = np.zeros(rows, dtype=np.int32)
        is_tree[:len(seqs)] = [s.tree_mask is not None for s in seqs]
        return AttentionMetadata(
            slot_mapping=self._put("slot_mapping", np.concatenate(slots)),
            cu_seqlens_q=self._put("cu_seqlens_q", cu),
            seq_lens=self._put("seq_lens", ctx.astype(np.int32)),
            prefix_lens=self._put("prefix_lens", prefix.astype(np.int32)),
            block_tables=self._put("block_tables", tables),
            is_tree=self._put("is_tree", is_tree),
            tree_masks=self._put("tree_masks", masks),
            block_size=self.block_size,
            seqs=list(seqs),
        )


def build_metadata(seqs: list[SeqAttention], block_size: int, device: torch.device | str = "cpu"
                   ) -> AttentionMetadata:
    """One-off metadata in fresh buffers (tests, benchmarks); engines keep a :class:`MetadataBuilder`."""
    return MetadataBuilder(block_size, device).build(seqs)
