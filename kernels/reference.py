"""Pure PyTorch attention over the paged KV cache: the ground truth every backend is tested against.

Once per step ``prepare`` splits the ragged batch in two (numpy, on the host):

- short sequences (decodes, draft trees, prefill chunks of at most ``SHORT_QUERY`` tokens) attend
  together: one gather index of their context slots and a dense ``[B, 1, Qmax, Lmax]`` mask, where
  ``Qmax`` is small by construction;
- every longer prefill chunk attends on its own, with no mask at all when it starts the sequence
  (``is_causal``) and a ``[n, prefix + n]`` mask after a prefix (the scheduler bounds ``n``).

So decodes beside a long prompt never pay for its query rows, and a long prompt never materialises a
``Q x L`` mask for its causal part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata, SeqAttention, slots_for

SHORT_QUERY = 32   # prefill chunks up to this many tokens join the padded group of decodes and trees


@dataclass
class PaddedGather:
    rows: torch.Tensor | None       # [B * Qmax] index into the T new tokens of each padded query row (None: all T, B = 1)
    query_valid: torch.Tensor       # [B, Qmax] bool
    kv_index: torch.Tensor          # [B, Lmax] flat KV slot of each context position (padding -> 0)
    attn_mask: torch.Tensor | None  # [B, 1, Qmax, Lmax] bool, True = may attend; None = attend to all


@dataclass
class Chunk:
    """A long causal prefill chunk: queries ``[start, start + num_new)`` of the batch."""

    start: int
    num_new: int
    kv_index: torch.Tensor          # [prefix + num_new] flat KV slots of its context
    attn_mask: torch.Tensor | None  # [num_new, prefix + num_new] bool after a prefix; None: from position 0


@dataclass
class RaggedPlan:
    padded: PaddedGather | None
    padded_tokens: torch.Tensor | None   # [Tp] batch positions of the padded group's valid queries (None: all)
    chunks: list[Chunk]


def visibility(s: SeqAttention) -> np.ndarray:
    """``[num_new, prefix + num_new]`` bool: what each new token of ``s`` may attend to."""
    n, p = s.num_new, s.prefix_len
    mask = np.ones((n, p + n), dtype=bool)
    mask[:, p:] = s.tree_mask if s.tree_mask is not None else np.tri(n, dtype=bool)
    return mask


def padded_gather(seqs: list[SeqAttention], offsets: list[int], block_size: int, device: torch.device,
                  whole: bool = False) -> PaddedGather:
    """The padded group of ``seqs`` (queries at batch ``offsets``); ``whole``: they are the whole batch."""
    num_seqs, q_max = len(seqs), max(s.num_new for s in seqs)
    ctx = [s.prefix_len + s.num_new for s in seqs]
    l_max = max(ctx)
    query_index = np.zeros((num_seqs, q_max), dtype=np.int64)
    query_valid = np.zeros((num_seqs, q_max), dtype=bool)
    kv_index = np.zeros((num_seqs, l_max), dtype=np.int64)
    mask = np.zeros((num_seqs, 1, q_max, l_max), dtype=bool)
    for b, (s, offset) in enumerate(zip(seqs, offsets)):
        n = s.num_new
        query_index[b, :n] = np.arange(offset, offset + n)
        query_valid[b, :n] = True
        kv_index[b, :ctx[b]] = slots_for(s.block_table, 0, ctx[b], block_size)
        mask[b, 0, :n, :ctx[b]] = visibility(s)
        mask[b, 0, n:, 0] = True  # padded query rows attend somewhere: no NaN rows
    return PaddedGather(
        rows=None if whole and num_seqs == 1 else torch.from_numpy(query_index.reshape(-1)).to(device),
        query_valid=torch.from_numpy(query_valid).to(device),
        kv_index=torch.from_numpy(kv_index).to(device),
        attn_mask=None if mask.all() else torch.from_numpy(mask).to(device),
    )


def ragged_plan(meta: AttentionMetadata, device: torch.device) -> RaggedPlan:
    offsets = np.concatenate([[0], np.cumsum(meta.query_lens)]).tolist()
    short = [b for b, s in enumerate(meta.seqs) if s.tree_mask is not None or s.num_new <= SHORT_QUERY]
    chunks = []
    for b, s in enumerate(meta.seqs):
        if b in short:
            continue
        slots = slots_for(s.block_table, 0, s.prefix_len + s.num_new, meta.block_size)
        mask = None if s.prefix_len == 0 else torch.from_numpy(visibility(s)).to(device)
        chunks.append(Chunk(offsets[b], s.num_new, torch.from_numpy(slots).to(device), mask))
    if not short:
        return RaggedPlan(None, None, chunks)
    padded = padded_gather([meta.seqs[b] for b in short], [offsets[b] for b in short], meta.block_size, device,
                           whole=not chunks)
    tokens = None
    if chunks:
        tokens = torch.from_numpy(np.concatenate([np.arange(offsets[b], offsets[b + 1]) for b in short])).to(device)
    return RaggedPlan(padded, tokens, chunks)


def gather_kv(cache: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Context entries ``index [..., L]`` of a paged cache -> ``[..., Hkv, L, D]``."""
    num_kv_heads, head_dim = cache.shape[-2:]
    kv = cache.view(-1, num_kv_heads, head_dim).index_select(0, index.reshape(-1)).to(dtype)
    return kv.view(*index.shape, num_kv_heads, head_dim).transpose(-3, -2)


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def prepare(self, meta: AttentionMetadata) -> RaggedPlan:
        return ragged_plan(meta, self.device)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        plan: RaggedPlan = meta.backend_data if meta.backend_data is not None else ragged_plan(meta, q.device)
        out = q.new_empty(q.shape)                                                 # [T, H, D]
        if plan.padded is not None:
            rows = self._attend_padded(q, k_cache, v_cache, plan.padded, scale)    # [Tp, H, D]
            if plan.padded_tokens is None:
                out = rows
            else:
                out.index_copy_(0, plan.padded_tokens, rows)
        for c in plan.chunks:
            qc = q[c.start:c.start + c.num_new].transpose(0, 1).unsqueeze(0)      # [1, H, n, D]
            k = gather_kv(k_cache, c.kv_index, q.dtype).unsqueeze(0)               # [1, Hkv, L, D]
            v = gather_kv(v_cache, c.kv_index, q.dtype).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, k, v, attn_mask=c.attn_mask, is_causal=c.attn_mask is None,
                                               scale=scale, enable_gqa=True)        # [1, H, n, D]
            out[c.start:c.start + c.num_new] = o[0].transpose(0, 1)
        return out

    @staticmethod
    def _attend_padded(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pad: PaddedGather,
                       scale: float) -> torch.Tensor:
        """Grouped-query attention folds each KV group's query heads into extra query rows
        (``[B, Hkv, group * Qmax, D]``), so keys and values are never repeated."""
        num_kv_heads, head_dim = k_cache.shape[-2:]
        batch, q_max = pad.query_valid.shape
        group = q.shape[1] // num_kv_heads
        qp = q if pad.rows is None else q.index_select(0, pad.rows)                # [B * Qmax, H, D]
        qp = qp.view(batch, q_max, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        qp = qp.reshape(batch, num_kv_heads, group * q_max, head_dim)              # [B, Hkv, group*Qmax, D]
        k = gather_kv(k_cache, pad.kv_index, q.dtype)                              # [B, Hkv, Lmax, D]
        v = gather_kv(v_cache, pad.kv_index, q.dtype)
        mask = None if pad.attn_mask is None else pad.attn_mask.repeat(1, 1, group, 1)  # [B, 1, group*Qmax, Lmax]
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale)  # [B, Hkv, group*Qmax, D]
        out = out.view(batch, num_kv_heads, group, q_max, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(batch, q_max, num_kv_heads * group, head_dim)            # [B, Qmax, H, D]
        return out[pad.query_valid]                                                # [Tp, H, D]
