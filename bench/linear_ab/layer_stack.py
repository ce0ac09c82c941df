"""The served target's projections in sequence (30 layers of qkv 960x576, o 576x576, gate_up 3072x576,
down 576x1536, optionally the 49152x576 head), random fp32 weights, at 1-33 rows, per kernel: MKL gemv
(``F.linear``), oneDNN prepacked, and MKL on a pre-transposed weight (``x @ W^T``). The weights do not fit
in cache, so this times streaming them, as a forward does. Median of 9, ms, 2 threads::

    .venv/bin/python bench/linear_ab/layer_stack.py > bench/results/issue8/layer_stack_intel.json
"""
import json
import time

import torch

import kernels.linear as L

torch.set_num_threads(2)
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
layers = [torch.randn(o, i) for _ in range(30) for o, i in SHAPES]
head = torch.randn(49152, 576)
KERNELS = {"gemv": lambda x, w: torch.nn.functional.linear(x, w),
           "onednn": lambda x, w: L.onednn(x, w, None),
           "x_at_w_t": lambda x, wt: torch.mm(x, wt)}


def run(kernel: str, weights: list[torch.Tensor], rows: int) -> float:
    xs = {i: torch.randn(rows, i) for i in (576, 1536)}
    t = time.perf_counter()
    for w in weights:
        KERNELS[kernel](xs[w.shape[1] if kernel != "x_at_w_t" else w.shape[0]], w)
    return time.perf_counter() - t


result = {}
with torch.inference_mode():
    for with_head in (False, True):
        stack = layers + [head] if with_head else layers
        weights = {"gemv": stack, "onednn": stack, "x_at_w_t": [w.t().contiguous() for w in stack]}
        for rows in (1, 2, 5, 9, 17, 33):
            for kernel in KERNELS:
                run(kernel, weights[kernel], rows)
                ms = sorted(run(kernel, weights[kernel], rows) for _ in range(9))[4] * 1e3
                result.setdefault("with_head" if with_head else "layers_only", {}).setdefault(str(rows), {})[kernel] = round(ms, 2)
print(json.dumps({"command": ".venv/bin/python bench/linear_ab/layer_stack.py", "threads": 2, "ms": result}))
