"""One-token forward of the served target: each single-row kernel of kernels/linear.py forced for every
weight, and ``auto`` (the per-shape pick timed on first use, what serving runs).

Usage: .venv/bin/python bench/linear_ab/single_row.py   (4 alternating rounds, median of 15 each, ms)
"""
import json

import torch

import kernels.linear as L
from server.build import build_engine
from server.config import ServerConfig
from server.worker.calibrate import measure_verify_cost

eng, _ = build_engine(ServerConfig(drafter="none"))
auto = L.single_row
modes = {"auto": auto} | {name: kernel for name, kernel in L.SINGLE_ROW.items() if name != "onednn" or L._ONEDNN}
res = {mode: [] for mode in modes}
for rnd in range(4):
    for mode, kernel in modes.items():
        L.single_row = kernel
        c = measure_verify_cost(eng.runner, [0], context=256, repeats=15)
        res[mode].append(round(c[0] * 1000, 1))
L.single_row = auto
print(json.dumps({"threads": torch.get_num_threads(), "ms_per_forward": res,
                  "auto_picks": {f"{o}x{i}": n for (o, i), n in L._single_row_pick.items()}}))
