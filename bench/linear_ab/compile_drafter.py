"""One EAGLE drafter forward (shipped config, random weights, fp32, 2 threads) over 1-4 new tokens at a 140-169-token
drafter context: the shipped eager path (prepacked oneDNN linears) against ``torch.compile`` (inductor, freezing,
dynamic shapes; oneDNN packing left to inductor). Median and p10 of 200 calls each, one process::

    .venv/bin/python bench/linear_ab/compile_drafter.py
"""

import json
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor

import kernels.linear
from drafters.eagle_model import EagleConfig, EagleDrafter

torch.set_num_threads(2)
cfg = EagleConfig.from_dict(json.loads(Path("drafters/checkpoints/smollm2-eagle/config.json").read_text()))
VOCAB = 49152
drafter = EagleDrafter(cfg, torch.randn(VOCAB, cfg.hidden_size), torch.randn(VOCAB, cfg.hidden_size)).eval()


def call(fn, new: int, past: int) -> None:
    kv = tuple(torch.randn(1, cfg.num_key_value_heads, past, cfg.head_dim) for _ in range(2))  # [1, Hkv, P, D]
    fn(torch.randint(0, VOCAB, (1, new)), torch.randn(1, new, cfg.hidden_size), torch.arange(past, past + new)[None], kv)


def forward(tokens, feats, positions, kv):
    return drafter(tokens, feats, positions, kv)[0]                                      # [1, T, H]


def timed(fn, label: str) -> None:
    with torch.inference_mode():
        for new, past in [(1, 100), (4, 140), (4, 141), (3, 150), (4, 160)]:          # warm-up (and compiles)
            call(fn, new, past)
        times = []
        for i in range(200):
            start = time.perf_counter()
            call(fn, 1 + i % 4, 140 + i % 30)
            times.append(time.perf_counter() - start)
    times.sort()
    print(f"{label}: median {times[100] * 1e3:.3f} ms, p10 {times[20] * 1e3:.3f} ms")


timed(forward, "eager, prepacked oneDNN (shipped)")
kernels.linear._ONEDNN = False          # dynamo cannot trace the prepacked op; inductor packs frozen weights itself
inductor.freezing = True
began = time.perf_counter()
compiled = torch.compile(forward, dynamic=True)
with torch.inference_mode():
    call(compiled, 4, 140)
print(f"first compile {time.perf_counter() - began:.1f} s")
timed(compiled, "torch.compile, inductor + freezing")
