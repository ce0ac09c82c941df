"""Target step latency on a random-weight model of a realistic shape (default: Llama-3-8B), bf16.

Random weights are honest for latency, never for acceptance. For every context length and step kind
(a decode of one token per request, a verify of ``n`` tree tokens per request) it times the engine's
own forward (``ModelRunner.forward``: CUDA-graph replay when captured, else eager) plus the LM head
over the rows verification reads, and compares the decode step with the time to stream the weights
once at the device's measured copy bandwidth (and at the nominal ``--bandwidth``)::

    python -m bench.step_latency --device cuda --out bench/results/step_latency_h100.json
    python -m bench.step_latency --device cpu --shape tiny --contexts 64 --out /tmp/step.json   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from bench.harness import machine_info
from kernels import SeqAttention
from server.cache.block_pool import BlockPool
from server.cache.kv_manager import KVManager
from server.models.llama import LlamaConfig, LlamaModel
from server.models.rope import RotaryEmbedding
from server.worker.device import now
from server.worker.model_runner import ModelRunner

SHAPES = {
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 8192},
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """Weights drawn on the device (no host copy of 16 GB): N(0, 0.02), norms 1."""
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta).to(device)
    return model.eval()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Bytes per second of a device-to-device copy (read + write counted), CUDA only."""
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    t = now(device)
    for _ in range(10):
        b.copy_(a)
    return 10 * nbytes / (now(device) - t)


def time_step(runner: ModelRunner, batch: int, context: int, n: int, repeats: int) -> float:
    """Median seconds of one step: ``batch`` requests with ``1 + n`` new tokens over ``context`` tokens."""
    tables = [runner.kv.allocate(f"b{i}", context + n + 1) for i in range(batch)]
    mask = np.tri(n + 1, dtype=bool) if n else None
    seqs = [SeqAttention(t, context, n + 1, mask) for t in tables]
    ids = [1] * (batch * (n + 1))
    positions = list(range(context, context + n + 1)) * batch
    rows = torch.arange(len(ids), device=runner.device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t = now(runner.device)
            hidden = runner.forward(ids, positions, seqs)
            runner.model.compute_logits(hidden[rows])
            times.append(now(runner.device) - t)
    for i in range(batch):
        runner.kv.free(f"b{i}")
    return float(np.median(times[2:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tree-tokens", type=int, nargs="+", default=[0, 16, 64], help="0 = decode")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cuda-graphs", choices=["on", "off", "both"], default="both")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="nominal bytes/s (H100 SXM: 3.35e12)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = random_model(args.shape, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block = 16
    need = max(args.batches) * (max(args.contexts) + max(args.tree_tokens) + 1)
    kv = KVManager(BlockPool(-(-need // block) + max(args.batches), block))
    runner = ModelRunner(model, kv, str(device), dtype)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
    measured = copy_bandwidth(device)
    results = []
    for graphs in modes if device.type == "cuda" else [False]:
        if graphs:
            runner.enable_cuda_graphs(max(args.batches), max(args.tree_tokens), max(args.contexts) + 1)
        for context in args.contexts:
            for batch in args.batches:
                for n in args.tree_tokens:
                    sec = time_step(runner, batch, context, n, args.repeats)
                    row = {"cuda_graphs": graphs, "context": context, "batch": batch, "tree_tokens": n,
                           "ms": 1000 * sec}
                    print(json.dumps(row), flush=True)
                    results.append(row)
    stream = {"weight_bytes": weight_bytes, "nominal_ms": 1000 * weight_bytes / args.bandwidth,
              "measured_copy_bandwidth": measured,
              "measured_ms": None if measured is None else 1000 * weight_bytes / measured}
    for row in results:
        row["vs_nominal_streaming"] = row["ms"] / stream["nominal_ms"]
    report = {"command": "python -m bench.step_latency " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "shape": args.shape, "config": SHAPES[args.shape], "dtype": args.dtype,
              "weight_streaming": stream, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"weights {weight_bytes / 1e9:.2f} GB: streaming {stream['nominal_ms']:.2f} ms at nominal bandwidth")


if __name__ == "__main__":
    main()
