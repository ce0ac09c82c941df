"""FlashAttention-style paged tree attention in Triton: one kernel launch for a whole mixed batch.

Design. ``prepare`` turns the ragged metadata, once per step and on the device, into a work list of
query tiles: tile ``w`` covers queries ``first .. first + BLOCK_Q - 1`` of sequence ``seq`` (``seq = -1``
for the idle tail of the list; its length is a bound known from tensor shapes alone, so nothing syncs
with the host and the launch grid is fixed for a given batch shape, as CUDA graphs need). The grid is
``(tiles, num_kv_heads)``: a program stacks the ``BLOCK_Q`` queries times the ``GROUP`` query heads that
share its KV head into the rows of one tile (row ``r``: query ``r // GROUP_P``, head ``r % GROUP_P``), so
each K/V tile is loaded once per group. It walks the sequence's context in ``BLOCK_N``-position tiles,
looks every position's page up in the block table, and keeps an fp32 online softmax (exp2, running max
and sum); the output is written in the query's dtype.

Masking is one pass over prefix and new tokens together: position ``j`` is visible when ``j < prefix``,
else (``c = j - prefix``) when ``c <= i`` for causal sequences or bit ``c % 32`` of ``tree_masks[t, c // 32]``
is set for tree sequences. KV tiles wholly inside the prefix skip the mask arithmetic (a scalar branch in
the loop); the mask words are loaded only for new-token columns. Causal tiles stop after their last
query's own position, all tiles at ``seq_lens[b]``.

Split context (flash-decoding). A decode or small tree batch has few query tiles: SmolLM2 decoding one
request is 3 programs (one per KV head), and an 8B-shaped one 8, each walking the whole context alone (the
first H100 run, ``bench/results/gpu/``, read 4k positions at batch 1 at ~0.15 TB/s). When the
``(tiles, kv heads)`` grid has fewer than two programs per SM, a third grid axis splits every tile's context
into up to ``MAX_SPLITS`` ranges of whole KV tiles (``splits``: from static shapes only, so a CUDA graph
replays what it captured); each program writes its normalised partial output and log2-sum-exp to fp32
scratch, and ``_merge_splits`` (one program per token and head) weights the parts by their softmax mass.
Empty ranges (short contexts) write -inf and weigh nothing.

The other split (an unmasked prefix pass plus a small tree pass, merged by log-sum-exp, SGLang's FA3 path)
is not implemented: ``python -m bench.kernel_attn`` records this kernel against SDPA and flash-attn.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (tests). Triton 3.9 reads that variable when
``@triton.jit`` wraps a function, its own standard library (``tl.zeros``, ``tl.max``, ``tl.sum``) included,
so it must be set before ``triton`` is first imported in the process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata

LOG2E = 1.4426950408889634
MAX_SPLITS = 16   # context splits of one query tile (flash-decoding), merged by log-sum-exp


@triton.jit
def _tree_attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    work_ptr, cu_ptr, seq_lens_ptr, prefix_ptr, is_tree_ptr, bt_ptr, mask_ptr,
    qk_scale, num_splits,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ko, stride_kh, stride_kd,
    stride_vb, stride_vo, stride_vh, stride_vd,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lt,
    stride_btb, stride_btp, stride_mt, stride_mw,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    FP32_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """One query tile of one sequence x one KV head; see the module docstring.

    (*) The tree flag is an ``[N]`` block rather than a scalar boolean: the triton 3.9 interpreter turns
    ``block & scalar-bool`` into an int32 mask that ``tl.load`` rejects. Under the interpreter, dots run in
    fp32 (``FP32_DOT``; its bf16 ``tl.dot`` multiplies raw bit patterns), on bf16-rounded operands.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(work_ptr + 2 * tile)
    if seq >= 0:
        first = tl.load(work_ptr + 2 * tile + 1)
        q_start = tl.load(cu_ptr + seq)
        q_len = tl.load(cu_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        prefix = tl.load(prefix_ptr + seq)
        is_tree = tl.load(is_tree_ptr + seq)

        rows = tl.arange(0, BLOCK_M)                                   # [M] (M >= BLOCK_Q * GROUP_P)
        qi = first + rows // GROUP_P                                   # [M] local query index
        g = rows % GROUP_P                                             # [M] head within the group
        row_ok = (rows < BLOCK_Q * GROUP_P) & (qi < q_len) & (g < GROUP)   # [M]
        tok = (q_start + qi).to(tl.int64)                              # [M] global token
        head = kv_head * GROUP + g                                     # [M]
        d = tl.arange(0, BLOCK_D)                                      # [D]
        d_ok = d < HEAD_DIM
        q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)   # [M, D]
        dot_ty = tl.float32 if FP32_DOT else q.dtype
        q = q.to(dot_ty)

        end = seq_len
        if is_tree == 0:
            end = tl.minimum(seq_len, prefix + tl.minimum(first + BLOCK_Q, q_len))
        span = tl.cdiv(tl.cdiv(end, num_splits), BLOCK_N) * BLOCK_N  # this split's share, whole KV tiles
        lo = split * span
        hi = tl.minimum(end, lo + span)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)           # [M] running max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                    # [M] running sum
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)           # [M, D]
        cols = tl.arange(0, BLOCK_N)                                   # [N]
        tree = (tl.zeros([BLOCK_N], dtype=tl.int32) + is_tree) != 0    # [N] a block, not a scalar (*)
        for start in range(lo, hi, BLOCK_N):
            pos = start + cols                                         # [N] context position
            pos_ok = pos < hi
            page = tl.load(bt_ptr + seq * stride_btb + (pos // PAGE) * stride_btp, mask=pos_ok, other=0)
            page = page.to(tl.int64)                                   # [N] block id
            offset = pos % PAGE                                        # [N]
            kv_ok = pos_ok[:, None] & d_ok[None, :]
            k_off = page[:, None] * stride_kb + offset[:, None] * stride_ko + kv_head * stride_kh
            k = tl.load(k_ptr + k_off + d[None, :] * stride_kd, mask=kv_ok, other=0.0)   # [N, D]
            v_off = page[:, None] * stride_vb + offset[:, None] * stride_vo + kv_head * stride_vh
            v = tl.load(v_ptr + v_off + d[None, :] * stride_vd, mask=kv_ok, other=0.0)   # [N, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(dot_ty)), input_precision="ieee")         # [M, N]
            else:
                s = tl.dot(q, tl.trans(k.to(dot_ty)))                                  # [M, N]
            s = s * qk_scale
            if start + BLOCK_N > prefix:                               # the tile reaches new tokens or `end`
                c = pos - prefix                                       # [N] new-token column (< 0: prefix)
                new = (c >= 0) & pos_ok                                # [N]
                causal_ok = c[None, :] <= qi[:, None]                  # [M, N]
                word_off = tok[:, None] * stride_mt + (c >> 5)[None, :] * stride_mw     # 32-bit words
                word_mask = row_ok[:, None] & (new & tree)[None, :]
                words = tl.load(mask_ptr + word_off, mask=word_mask, other=0)              # [M, N]
                tree_ok = ((words >> (c & 31)[None, :]) & 1) != 0      # [M, N]
                new_ok = tl.where(tree[None, :], tree_ok, causal_ok)
                visible = pos_ok[None, :] & ((c < 0)[None, :] | new_ok)   # [M, N]
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))                      # [M]
            alpha = tl.exp2(m_i - m_new)                               # [M]
            p = tl.exp2(s - m_new[:, None])                            # [M, N]
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype).to(dot_ty), v.to(dot_ty), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype).to(dot_ty), v.to(dot_ty))
            acc = acc * alpha[:, None] + pv                            # [M, D]
            m_i = m_new

        seen = l_i > 0                                                 # [M] (an empty split saw nothing)
        out = acc / tl.where(seen, l_i, 1.0)[:, None]                  # [M, D]
        o_off = split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        if SPLIT:                                                      # log2-sum-exp of this split's scores
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + split * stride_ls + tok * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    part_ptr, lse_ptr, o_ptr, num_splits,
    stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (token, head): the splits' outputs weighted by their share of the softmax mass (log2 units)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + s * stride_ls + tok * stride_lt + head, mask=s_ok, other=float("-inf"))   # [S]
    top = tl.maximum(tl.max(lse, 0), -1.0e30)                          # finite even for a padding row
    w = tl.exp2(lse - top)                                             # [S]; 0 for empty splits
    part = tl.load(part_ptr + s[:, None] * stride_ps + tok * stride_pt + head * stride_ph + d[None, :],
                   mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)                       # [S, D]
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1.0e-30)                          # [D]
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + d * stride_od, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@dataclass
class TileWork:
    """Per-step query-tile work list shared by all layers."""

    work: torch.Tensor   # [tiles, 2] int32 (sequence or -1, first local query); a view of a reused buffer
    block_q: int         # queries per tile


class TritonBackend(AttentionBackend):
    """Paged tree attention in one Triton launch per layer (see the module docstring).

    ``block_q`` (queries per tile; default: 1 for decode-only batches, else up to 16 by mean query
    length) and ``block_n`` (context positions per tile) may be forced, e.g. by benchmarks.
    """

    name = "triton"
    graphable = True

    def __init__(self, block_size: int, device: torch.device | str = "cpu", *, block_q: int | None = None,
                 block_n: int = 64, split_kv: int | None = None):
        super().__init__(block_size, device)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if split_kv is not None and not 1 <= split_kv <= MAX_SPLITS:
            raise ValueError(f"split_kv must be 1..{MAX_SPLITS}, got {split_kv}")
        self.block_q = block_q
        self.block_n = block_n
        self.split_kv = split_kv
        cuda = self.device.type == "cuda"
        self._sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 0
        self._work = torch.empty(0, 2, dtype=torch.int32, device=self.device)   # [cap, 2]
        self._index = torch.empty(0, dtype=torch.int64, device=self.device)     # [cap] 0..cap-1

    def _block_q(self, num_tokens: int, num_seqs: int) -> int:
        if self.block_q is not None:
            return self.block_q
        mean = -(-num_tokens // max(num_seqs, 1))
        return min(16, triton.next_power_of_2(mean))

    def splits(self, programs: int, max_context: int) -> int:
        """Context splits per (tile, KV head) program: enough programs for two per SM on CUDA, each split at
        least two KV tiles of the longest context the block table can address (1 off CUDA unless forced). Only
        static shapes decide, so a CUDA graph replays the split it captured."""
        if self.split_kv is not None:
            return self.split_kv
        if not self._sms:
            return 1
        by_context = max(1, max_context // (2 * self.block_n))
        return max(1, min(MAX_SPLITS, by_context, -(-2 * self._sms // programs)))

    def _buffers(self, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        if tiles > self._work.shape[0]:
            cap = max(tiles, 2 * self._work.shape[0], 16)
            self._work = torch.empty(cap, 2, dtype=torch.int32, device=self.device)
            self._index = torch.arange(cap, dtype=torch.int64, device=self.device)
        return self._work[:tiles], self._index[:tiles]

    def prepare(self, meta: AttentionMetadata) -> TileWork:
        """Device-side work list: ``sum_b ceil(q_len_b / Q) <= (T + B (Q - 1)) / Q`` tiles, idle ones last."""
        cu = meta.cu_seqlens_q                                         # [B + 1]
        num_seqs, num_tokens = cu.shape[0] - 1, meta.slot_mapping.shape[0]
        block_q = self._block_q(num_tokens, num_seqs)
        tiles = max(1, (num_tokens + num_seqs * (block_q - 1)) // block_q)
        work, index = self._buffers(tiles)                             # [tiles, 2], [tiles]
        per_seq = (cu[1:] - cu[:-1] + block_q - 1) // block_q          # [B] tiles per sequence
        ends = torch.cumsum(per_seq, 0)                                # [B]
        seq = torch.searchsorted(ends, index, right=True)              # [tiles]; B = idle
        busy = seq < num_seqs
        seq = seq.clamp_(max=num_seqs - 1)
        first = (index - (ends - per_seq)[seq]) * block_q              # [tiles]
        work[:, 0].copy_(torch.where(busy, seq, -1))
        work[:, 1].copy_(torch.where(busy, first, 0))
        return TileWork(work, block_q)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """Queries ``[T, H, D]`` over their paged context -> ``[T, H, D]`` in ``q.dtype``, one launch."""
        plan = meta.backend_data if isinstance(meta.backend_data, TileWork) else self.prepare(meta)
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        if k_cache.shape[1] != meta.block_size:
            raise ValueError(f"cache pages hold {k_cache.shape[1]} positions, metadata says {meta.block_size}")
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)                                      # [T, H, D]
        if num_tokens == 0:
            return out
        group_p = triton.next_power_of_2(group)
        block_m = max(16, plan.block_q * group_p)                      # tl.dot wants >= 16 rows
        interpret = bool(triton.knobs.runtime.interpret)
        bt, masks = meta.block_tables, meta.tree_masks                 # [B, P], [T, W]
        fp32 = q.dtype == torch.float32
        splits = self.splits(plan.work.shape[0] * num_kv_heads, bt.shape[1] * meta.block_size)
        block_d = max(16, triton.next_power_of_2(head_dim))
        if splits == 1:                                                # the output directly; no log-sum-exp
            part, lse, part_strides, lse_strides = out, out, (0, *out.stride()), (0, 0)
        else:
            part = torch.empty(splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
            lse = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)   # [S, T, H]
            part_strides, lse_strides = part.stride(), lse.stride()[:2]                              # [S, T, H, D]
        grid = (plan.work.shape[0], num_kv_heads, splits)
        _tree_attn_fwd[grid](
            q, k_cache, v_cache, part, lse,
            plan.work, meta.cu_seqlens_q, meta.seq_lens, meta.prefix_lens, meta.is_tree, bt, masks,
            scale * LOG2E, splits,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *part_strides, *lse_strides,
            bt.stride(0), bt.stride(1), masks.stride(0), masks.stride(1),
            HEAD_DIM=head_dim, GROUP=group, PAGE=meta.block_size,
            BLOCK_Q=plan.block_q, GROUP_P=group_p, BLOCK_M=block_m, BLOCK_D=block_d,
            BLOCK_N=self.block_n, SPLIT=splits > 1, FP32_DOT=fp32 or interpret, IEEE=fp32 and not interpret,
            num_warps=4 if block_m <= 64 else 8, num_stages=2,
        )
        if splits > 1:
            _merge_splits[(num_tokens, num_heads)](
                part, lse, out, splits, *part.stride()[:3], *lse.stride()[:2], *out.stride(),
                HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
            )
        return out

