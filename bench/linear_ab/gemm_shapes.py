"""Microbenchmark of one projection per shape and row count: F.linear, MKL (W @ x^T)^T, MKL packed, oneDNN packed.

Usage: .venv/bin/python bench/linear_ab/gemm_shapes.py [threads]   (median ms per call; weights stay in cache)
"""
# ruff: noqa: B023, BLE001  (each lambda is timed inside its own iteration; a failed pack is printed and skipped)
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
def bench(f, reps=40):
    for _ in range(5): f()
    ts=[]
    for _ in range(reps):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1000
shapes = [(960,576),(576,576),(3072,576),(576,1536),(8192,576),(49152,576)]
for (o,i) in shapes:
    W = torch.randn(o,i); b=None
    try:
        Wmkl = torch.ops.mkl._mkl_reorder_linear_weight(W, 16)
    except Exception as e:
        Wmkl=None; print("mkl pack fail", e)
    try:
        Wdnn = torch.ops.mkldnn._reorder_linear_weight(W, 16)
    except Exception as e:
        Wdnn=None; print("dnn pack fail", e)
    for n in (1,2,4,9,16):
        x = torch.randn(n,i)
        r = {}
        r["F.linear"] = bench(lambda: torch.nn.functional.linear(x, W))
        r["(W@xT)T"] = bench(lambda: torch.mm(W, (x if n>1 else torch.cat([x,x])).t().contiguous()).t())
        if Wmkl is not None:
            r["mkl_packed"] = bench(lambda: torch.ops.mkl._mkl_linear(x, Wmkl, W, None, 16))
        if Wdnn is not None:
            r["dnn_packed"] = bench(lambda: torch.ops.mkldnn._linear_pointwise(x, Wdnn, None, "none", [], ""))
        print(o,i,n, {k: round(v,3) for k,v in r.items()}, flush=True)
