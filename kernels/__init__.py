"""The one attention dispatch point: every model layer calls these, never a backend directly.

Only the PyTorch reference backend exists so far; GPU backends (Triton, flash-attn)
plug in here by device and availability and are tested against ``kernels.reference``.
"""

from __future__ import annotations

from kernels import reference
from kernels.metadata import AttentionMetadata, SeqAttention, build_metadata, slots_for

BACKENDS = {"reference": reference}


def get_backend(device: str = "cpu", name: str | None = None):
    """Pick the attention backend module for a device (``name`` forces one)."""
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
        return BACKENDS[name]
    return reference


__all__ = ["AttentionMetadata", "SeqAttention", "build_metadata", "get_backend", "reference", "slots_for"]
