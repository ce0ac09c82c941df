"""Logit processing (temperature, top-k, top-p) and per-request seeded sampling."""

from __future__ import annotations

import os

import torch

from server.engine.request import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from ``seed``, or from the OS when no seed is given."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[N, V]`` logits of one request -> probabilities after temperature, top-k, top-p."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return x.softmax(-1)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One next token from ``logits [V]``: argmax when greedy, else a seeded draw."""
    if params.greedy:
        return int(logits.argmax())
    probs = processed_probs(logits.unsqueeze(0), params)[0]
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator))
