"""The kernel microbenchmark's CPU smoke mode runs and records what a GPU run records.

It runs in a fresh process: the Triton interpreter must be switched on before triton is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_smoke_run_writes_results(tmp_path):
    out = tmp_path / "kernel_attn.json"
    cmd = [sys.executable, "-m", "bench.kernel_attn", "--device", "cpu", "--out", str(out),
           "--warmup", "0", "--repeats", "1"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["smoke_only"] and res["triton"] and res["command"].startswith("python -m bench.kernel_attn")
    rows = res["results"]
    assert {(r["scenario"], r["batch"]) for r in rows} == {("tree8", 1), ("tree8", 2), ("decode", 1), ("decode", 2)}
    for r in rows:
        if r["method"].startswith("triton"):
            assert r["max_abs_err_vs_fp32_ref"] < 1e-5
        assert r["median_us"] > 0
