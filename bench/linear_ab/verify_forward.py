"""Full SmolLM2 verify forward (256-token context) with one projection path, for same-host A/B runs.

Usage: .venv/bin/python bench/linear_ab/verify_forward.py skinny|on|off
skinny = the earlier MKL (W @ x^T)^T path for 1-16 rows; off = F.linear; on = kernels/linear.py as it is
(the A/B recorded in bench/results/README.md ran "on" when 2-64 rows *and* single rows went through oneDNN).
"""
import sys

import torch
import torch.nn.functional as F

import kernels.linear as L

mode = sys.argv[1]
def skinny(x, weight, bias=None):
    rows = x.shape[:-1].numel()
    if rows == 0 or rows > 16 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    cols = (flat if rows > 1 else torch.cat([flat, flat])).t()
    y = torch.mm(weight, cols).t()[:rows]
    if bias is not None: y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
if mode == "skinny":
    L.linear = skinny
    L.Linear.forward = lambda self, x: skinny(x, self.weight, self.bias)
elif mode == "off":
    L._ONEDNN = False
from server.build import build_engine
from server.config import ServerConfig
from server.worker.calibrate import measure_verify_cost

eng, _ = build_engine(ServerConfig(drafter="none"))
c = measure_verify_cost(eng.runner, [0, 1, 3, 7, 15, 31, 63, 127], context=256, repeats=7)
print(mode, {n: round(v*1000, 1) for n, v in c.items()})
