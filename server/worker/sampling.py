"""Logit processing (temperature, top-k, top-p) and per-request seeded sampling.

Every draw happens on the generator's device and never waits for the device: the only host
transfer is the caller's, when it reads the sampled index.
"""

from __future__ import annotations

import os

import torch

from server.engine.request import SamplingParams

SMALLEST_FP32_TEMPERATURE = 1e-30


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``seed``, or from the OS when no seed is given."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def exponential_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """I.i.d. ``Exp(1)`` noise shaped like ``like``, on its device, strictly positive."""
    noise = torch.empty_like(like).exponential_(generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a CPU draw can be exactly 0


def sample_rows(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of non-negative, unnormalised ``weights`` (``[R, V] -> [R]`` int64).

    Exponential race: ``argmax(w / E)`` with ``E ~ Exp(1)`` i.i.d. picks ``i`` with probability
    ``w[i] / sum(w)``. It is what ``torch.multinomial`` does for one sample, minus the input
    checks that read the tensor back to the host. A row without mass yields an arbitrary index.
    """
    return (weights / exponential_noise(weights, generator)).argmax(-1)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[N, V]`` logits of one request -> probabilities after temperature, top-k, top-p.

    Exact for every temperature > 0 and top_p > 0, however small: the row maximum is subtracted before
    dividing by the temperature (so the largest logit maps to 0, never to ``inf - inf``), and the most
    likely token is always kept by top-p (a threshold that underflows float32 cannot drop every token).
    """
    x = logits.float()
    x = x - x.amax(-1, keepdim=True)
    if params.temperature < SMALLEST_FP32_TEMPERATURE:
        x = x.double()                       # the temperature itself would round to 0 in float32
    x = x / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= params.top_p  # keep the smallest prefix reaching top_p
        drop_sorted[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return x.softmax(-1).float()


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One next token from ``logits [V]``: argmax when greedy, else a seeded draw.

    The draw runs on ``generator.device`` (``logits`` move there first if they live elsewhere);
    reading the token back is the one host transfer.
    """
    if params.greedy:
        return int(logits.argmax())
    probs = processed_probs(logits.to(generator.device).unsqueeze(0), params)  # [1, V]
    return int(sample_rows(probs, generator)[0])
