"""One-token forward, single rows through MKL's two-column product ("hybrid", kernels/linear.py) vs oneDNN.

Usage: .venv/bin/python bench/linear_ab/single_row.py   (4 alternating rounds, median of 15 each, ms)
"""
import torch

import kernels.linear as L
from server.build import build_engine
from server.config import ServerConfig
from server.worker.calibrate import measure_verify_cost

eng, _ = build_engine(ServerConfig(drafter="none"))
orig = L.single_row
def via_onednn(flat, w, b):
    return torch.ops.mkldnn._linear_pointwise(flat, L.packed_weight(w), b, "none", [], "")
res = {"hybrid": [], "onednn": []}
for rnd in range(4):
    for mode in ("hybrid", "onednn"):
        L.single_row = orig if mode == "hybrid" else via_onednn
        c = measure_verify_cost(eng.runner, [0], context=256, repeats=15)
        res[mode].append(round(c[0]*1000, 1))
print(res)
