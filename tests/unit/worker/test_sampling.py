"""Temperature, top-k, top-p and seeded sampling."""

from __future__ import annotations

import torch

from server.engine.request import SamplingParams
from server.worker.sampling import new_generator, processed_probs, sample_token

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])


def test_top_k_keeps_k_best():
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))[0]
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p[:2], LOGITS[0, :2].softmax(-1))


def test_top_p_keeps_smallest_prefix_reaching_p():
    full = LOGITS[0].softmax(-1)
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=float(full[0] + 0.01)))[0]
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=float(full[0] - 0.01)))[0]
    assert p[0] == 1.0


def test_temperature_sharpens():
    hot = processed_probs(LOGITS, SamplingParams(temperature=2.0))[0]
    cold = processed_probs(LOGITS, SamplingParams(temperature=0.5))[0]
    assert cold[0] > hot[0]


def test_greedy_and_seeded_reproducibility():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))
    assert sample_token(logits, SamplingParams(temperature=0.0), new_generator(None)) == int(logits.argmax())
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample_token(logits, params, g) for g in [new_generator(7)] for _ in range(20)]
    b = [sample_token(logits, params, g) for g in [new_generator(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    params = SamplingParams(temperature=1.0)
    gen = new_generator(0)
    draws = torch.tensor([sample_token(LOGITS[0], params, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, LOGITS[0].softmax(-1), atol=0.03, rtol=0)
