"""The engine with the Triton attention backend, on CPU under the Triton interpreter: greedy output with
prompt-lookup trees equals plain greedy decoding (transformers), batched, with prefill chunks, decodes and
tree verifies mixed in one step. Runs in a fresh process because ``TRITON_INTERPRET=1`` must be set before
triton is first imported (see tests/unit/kernels/test_triton_tree_attn.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def main() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from helpers import (
        assert_matches_reference,
        hf_model_from,
        native_from,
        random_prompts,
        tiny_engine,
        tiny_hf_config,
    )

    from drafters.lookup import LookupDrafter

    hf = hf_model_from(tiny_hf_config())
    model = native_from(tiny_hf_config(), hf.state_dict())
    engine = tiny_engine(model, num_blocks=128, block_size=4, attention_backend="triton",
                         drafter=LookupDrafter(max_tree_tokens=6))
    assert engine.runner.backend.name == "triton"
    prompts = [p * 2 for p in random_prompts(3, seed=11, min_len=3, max_len=8)]   # repeats: lookup drafts
    reqs = assert_matches_reference(engine, hf, prompts, 16)
    assert sum(r.spec.drafted_tokens for r in reqs) > 0
    print("ok")


def test_triton_backend_engine_is_lossless():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    main()
