"""Verify-forward cost of the embedded model on 1 or 2 torch threads, for same-host A/B runs.

Usage: OMP_NUM_THREADS=N .venv/bin/python bench/linear_ab/verify_threads.py N   (alternate N = 2, 1, 2, 1)
Prints the median ms of a target forward plus its LM head for 1 + n tokens over 256 context tokens.
"""
import sys

import torch

from server.build import build_engine
from server.config import ServerConfig
from server.worker.calibrate import measure_verify_cost

threads = int(sys.argv[1])
torch.set_num_threads(threads)
eng, _ = build_engine(ServerConfig(drafter="none", num_threads=threads, calibrate_tree=False))
c = measure_verify_cost(eng.runner, [0, 4, 8, 16], context=256, repeats=9)
print({n: round(v * 1000, 1) for n, v in c.items()})
