"""CUDA graphs for the target forward of decode and tree-verify steps, at bucketed token counts.

A step without prefill chunks (every request feeds its root plus its draft tree, or one token) is
padded to the smallest captured bucket of ``tokens`` tokens (powers of two up to the largest tree
batch) and ``min(tokens, max_num_seqs)`` sequences, and replayed: the host only copies token ids,
positions and ragged metadata into the graph's static buffers. Padded sequences have no queries and
no context; padded tokens write their keys and values into a scratch block the KV pool never hands
out, and their hidden rows are ignored. Larger steps and steps with prefill run eagerly.

The graphs own their metadata buffers and their own backend instance (its per-step work buffers),
so eager steps, whose buffers grow, never move memory a graph reads. Buckets are captured largest
first, so every buffer has its final size before the first capture. Only backends whose ``prepare``
and ``attend`` stay on the device can be captured (``AttentionBackend.graphable``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from kernels import AttentionBackend, AttentionMetadata, MetadataBuilder, SeqAttention
from kernels.metadata import MASK_WORD_BITS, Padding
from server.models.llama import LlamaModel

log = logging.getLogger(__name__)


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two below ``max_tokens``, then ``max_tokens`` itself: ``[1, 2, 4, ..., max_tokens]``."""
    sizes = [1 << i for i in range(max(1, max_tokens).bit_length()) if 1 << i < max_tokens]
    return [*sizes, max_tokens]


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    pad: Padding
    input_ids: torch.Tensor   # [tokens] static input
    positions: torch.Tensor   # [tokens] static input
    meta: AttentionMetadata   # views of the graph runner's static metadata buffers
    hidden: torch.Tensor      # [tokens, hidden] static output


class GraphRunner:
    """Captures and replays the target forward; ``run`` returns ``None`` when a step has no bucket."""

    def __init__(self, model: LlamaModel, backend: AttentionBackend, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, max_tokens: int, max_tree_tokens: int, max_model_len: int, scratch_block: int):
        if not backend.graphable:
            raise ValueError(f"attention backend {backend.name!r} cannot be captured in a CUDA graph")
        self.model, self.kv_caches = model, kv_caches
        self.device = backend.device
        self.backend = type(backend)(backend.block_size, backend.device)      # private per-step buffers
        self.builder = MetadataBuilder(backend.block_size, backend.device)    # private metadata buffers
        self.max_num_seqs = max_num_seqs
        self.mask_words = max(1, -(-(max_tree_tokens + 1) // MASK_WORD_BITS))
        self.table_width = -(-(max_model_len + max_tree_tokens + 1) // backend.block_size)
        self.scratch_slot = scratch_block * backend.block_size
        self.buckets = token_buckets(max_tokens)
        self.steps: dict[int, CapturedStep] = {}
        self.pool = None

    def padding(self, tokens: int) -> Padding:
        return Padding(seqs=min(tokens, self.max_num_seqs), tokens=tokens, mask_words=self.mask_words,
                       table_width=self.table_width, scratch_slot=self.scratch_slot)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (logs the time taken)."""
        t0 = time.perf_counter()
        scratch_block = [self.scratch_slot // self.builder.block_size]
        for tokens in sorted(self.buckets, reverse=True):
            pad = self.padding(tokens)
            meta = self.builder.build([SeqAttention(scratch_block, 0, 1)], pad)
            ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
            positions = torch.zeros(tokens, dtype=torch.long, device=self.device)
            meta.backend_data = self.backend.prepare(meta)
            self.model(ids, positions, self.kv_caches, meta, self.backend)          # warm-up: sizes buffers
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                meta.backend_data = self.backend.prepare(meta)
                hidden = self.model(ids, positions, self.kv_caches, meta, self.backend)   # [tokens, hidden]
            self.pool = graph.pool()
            self.steps[tokens] = CapturedStep(graph, pad, ids, positions, meta, hidden)
        torch.cuda.synchronize(self.device)
        log.info("captured %d CUDA graphs (tokens %s) in %.1f s", len(self.steps), self.buckets,
                 time.perf_counter() - t0)

    def bucket(self, num_seqs: int, num_tokens: int) -> int | None:
        return next((t for t in self.buckets if t >= num_tokens and min(t, self.max_num_seqs) >= num_seqs), None)

    @torch.inference_mode()   # the captured buffers are inference tensors: write them only in inference mode
    def run(self, ids: list[int], positions: list[int], seqs: list[SeqAttention]) -> torch.Tensor | None:
        """Hidden ``[T, hidden]`` of a decode/verify step by graph replay, or ``None`` (run it eagerly)."""
        tokens = self.bucket(len(seqs), len(ids))
        if tokens is None or tokens not in self.steps:
            return None
        step = self.steps[tokens]
        if any(-(-(s.prefix_len + s.num_new) // self.builder.block_size) > self.table_width for s in seqs):
            return None
        self.builder.build(seqs, step.pad)                                   # refills step.meta's buffers
        host = np.zeros((2, tokens), dtype=np.int64)
        host[0, :len(ids)], host[1, :len(positions)] = ids, positions
        step.input_ids.copy_(torch.from_numpy(host[0]))
        step.positions.copy_(torch.from_numpy(host[1]))
        step.graph.replay()
        return step.hidden[:len(ids)].clone()                                # the next replay overwrites
