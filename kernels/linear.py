"""Dense projection dispatch: ``y = x @ W^T + b`` with a prepacked oneDNN path for CPU inference.

Decoding and tree verification multiply a handful of rows (1..64 tokens) by every weight
matrix. On the development CPUs (AMD EPYC, AVX-512) the MKL paths behind ``F.linear`` run
such skinny products far below memory bandwidth, and their cost grows with every extra row.
oneDNN with the weight reordered once into its blocked layout (``mkldnn._reorder_linear_weight``,
the kernel PyTorch's inductor uses for frozen CPU linears) is nearly flat from 1 to 16 rows;
measured per call on 2 cores (fp32, ``bench/linear_ab/gemm_shapes.py``): 3072x576 at 1 / 9 / 16
rows 0.14 / 0.53 / 0.54 ms (F.linear) -> 0.08 / 0.18 / 0.28 ms; the 49152x576 LM head
10.7 / 21.4 / 21.9 ms -> 5.5 / 5.6 / 6.5 ms. In the full SmolLM2 forward (256-token context)
8 / 16 / 64 tokens drop by 1.3-1.7x. A single row (plain decoding) is memory-bound, and which kernel
streams it fastest depends on the CPU: MKL's two-column product won on the AMD EPYC hosts, MKL's gemv
(``F.linear``) on an Intel Xeon (Sapphire Rapids class), where the two-column product took 3x as long
for the LM head (``bench/linear_ab/single_row.py``). So ``single_row`` times the candidates once per
weight shape, on first use, and keeps the fastest; ``TREESPEC_SINGLE_ROW=gemv|two_column|onednn`` names
one kernel for every shape instead (rounding then does not depend on a timing: the tests set it). The
packed copy is made on first use, remade when the weight changes (``_version``, storage) and dropped
with the weight; training (grad enabled), CUDA and other dtypes use ``F.linear``. Results agree with ``F.linear`` to fp32 rounding.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64      # larger inputs (prefill) keep MKL, which is at its best there


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = onednn_available()
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()   # bf16 kernels (native or emulated)
_packed: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}  # id -> (weight, data_ptr, _version, packed)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN-blocked copy of ``weight [out, in]``, cached while the tensor lives and is unchanged."""
    key = id(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight.data_ptr() and hit[2] == weight._version:
        return hit[3]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _packed.pop, key, None)
    _packed[key] = (weakref.ref(weight), weight.data_ptr(), weight._version, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in]`` -> ``[..., out]`` in ``x``'s dtype; a weight of another dtype is cast to it, except
    that fp32 activations times bf16 weights on the CPU run in bf16 (``mixed_bf16``)."""
    rows = x.shape[:-1].numel()
    if x.dtype != weight.dtype:
        if x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and not x.is_cuda:
            return mixed_bf16(x, weight, bias)
        weight = weight.to(x.dtype)
    if (x.is_cuda or x.dtype != torch.float32 or weight.dtype != torch.float32 or rows == 0
            or rows > PACKED_MAX_ROWS or torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).contiguous()                             # [m, in]
    if rows == 1:
        y = single_row(flat, weight, bias)
    elif _ONEDNN:
        y = onednn(flat, weight, bias)                                           # [m, out]
    else:
        y = F.linear(flat, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def mixed_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``x [..., in]`` times bf16 ``weight [out, in]`` -> fp32 ``[..., out]``: the product runs in bf16
    (fp32 accumulation) on the prepacked oneDNN weight, reading half the bytes of an fp32 one; the bias is
    added in fp32. For the drafters' weights on CPUs with native bf16 (``bf16_supported``)."""
    rows = x.shape[:-1].numel()
    flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)                        # [m, in]
    if _ONEDNN_BF16 and 0 < rows <= PACKED_MAX_ROWS and not torch.is_grad_enabled():
        y = onednn(flat, weight, None)                                           # [m, out]
    else:
        y = F.linear(flat, weight)
    y = y.float()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0])


def bf16_supported() -> bool:
    """True where oneDNN runs bf16 products natively (AVX512-BF16 / AMX CPUs)."""
    return _ONEDNN_BF16 and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def two_column(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W @ x^T`` with the row doubled (MKL's gemm for two columns; on AMD EPYC it beat gemv and oneDNN)."""
    y = torch.mm(weight, torch.cat([flat, flat]).t())[:, :1].t()                # [1, out]
    return y + bias if bias is not None else y


def onednn(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``flat [m, in]`` times the prepacked ``weight`` (+ ``bias``) through oneDNN -> ``[m, out]`` (any row count)."""
    return torch.ops.mkldnn._linear_pointwise(flat, packed_weight(weight), bias, "none", [], "")


SINGLE_ROW: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "gemv": F.linear, "two_column": two_column, "onednn": onednn}
_single_row_pick: dict[tuple[int, int], str] = {}     # weight shape -> the fastest SINGLE_ROW kernel, timed once
SINGLE_ROW_ENV = "TREESPEC_SINGLE_ROW"                  # auto (default), or one SINGLE_ROW kernel for every shape


def single_row(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``flat [1, in]`` -> ``[1, out]`` through the kernel that was fastest for this weight shape (``pick_single_row``)."""
    name = _single_row_pick.get(tuple(weight.shape)) or pick_single_row(flat, weight, bias)
    return SINGLE_ROW[name](flat, weight, bias)


def pick_single_row(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rounds: int = 3,
                    calls: int = 3) -> str:
    """Time each ``SINGLE_ROW`` kernel (oneDNN where available) on this product, round-robin, and remember the one
    with the fastest mean of ``calls`` calls for ``weight``'s shape (or the one ``TREESPEC_SINGLE_ROW`` names).
    All agree to fp32 rounding."""
    forced = os.environ.get(SINGLE_ROW_ENV, "auto")
    if forced != "auto":
        if forced not in SINGLE_ROW or (forced == "onednn" and not _ONEDNN):
            raise ValueError(f"{SINGLE_ROW_ENV}={forced}: choose auto or one of {sorted(SINGLE_ROW)} (onednn needs "
                             f"a torch build with oneDNN)")
        _single_row_pick[tuple(weight.shape)] = forced
        return forced
    names = [n for n in SINGLE_ROW if n != "onednn" or _ONEDNN]
    best = dict.fromkeys(names, float("inf"))
    for _ in range(rounds):
        for name in names:
            kernel = SINGLE_ROW[name]
            kernel(flat, weight, bias)                                           # warm (and pack) first
            start = time.perf_counter()
            for _ in range(calls):
                kernel(flat, weight, bias)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    pick = _single_row_pick[tuple(weight.shape)] = min(best, key=best.get)
    log.info("single-row kernel for %dx%d weights: %s (%s)", *weight.shape, pick,
             ", ".join(f"{n} {best[n] * 1e3:.3f} ms" for n in names))
    return pick


class Linear(torch.nn.Linear):
    """``nn.Linear`` routed through :func:`linear` (same parameters and state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
