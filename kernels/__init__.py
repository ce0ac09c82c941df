"""The one attention dispatch point: the runner asks for a backend once, for its device.

``reference`` (pure PyTorch) runs anywhere and is the ground truth; ``triton`` (FlashAttention-style
paged tree attention, the default on CUDA) is tested against it. Triton kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from kernels.backend import AttentionBackend
from kernels.metadata import AttentionMetadata, MetadataBuilder, SeqAttention, build_metadata, slots_for
from kernels.reference import ReferenceBackend

BACKENDS = {"reference": "kernels.reference:ReferenceBackend",
            "triton": "kernels.triton_tree_attn:TritonBackend"}


def backend_class(name: str) -> type[AttentionBackend]:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ValueError(f"attention backend {name!r} is not available here: {e}") from e


def default_backend_name(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "reference"


def get_backend(block_size: int, device: torch.device | str = "cpu", name: str | None = None) -> AttentionBackend:
    """The attention backend for ``device`` (``name`` forces one)."""
    device = torch.device(device)
    name = name or default_backend_name(device)
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention backend {name!r} needs a CUDA device (triton on CPU: TRITON_INTERPRET=1)")
    return backend_class(name)(block_size, device)


__all__ = ["AttentionBackend", "AttentionMetadata", "MetadataBuilder", "ReferenceBackend", "SeqAttention",
           "build_metadata", "get_backend", "slots_for"]
