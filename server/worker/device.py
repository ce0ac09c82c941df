"""Device helpers shared by the runner, calibration and benchmarks."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA) so that host timers measure work, not kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished what was queued."""
    synchronize(device)
    return time.perf_counter()
