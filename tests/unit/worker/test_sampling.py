"""Temperature, top-k, top-p and seeded sampling."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine.request import SamplingParams
from server.worker.sampling import (
    exponential_noise,
    new_generator,
    processed_probs,
    sample_rows,
    sample_token,
)

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


def test_generator_lives_on_the_requested_device():
    for device in ("cpu", torch.device("cpu")):
        gen = new_generator(5, device)
        assert gen.device == torch.device("cpu") and gen.initial_seed() == 5
    assert new_generator(None).initial_seed() != new_generator(None).initial_seed()


def test_sample_rows_follows_weights_and_skips_zeros():
    gen = new_generator(1)
    weights = torch.tensor([[0.0, 0.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 6.0]])  # [3, 4]
    draws = torch.stack([sample_rows(weights, gen) for _ in range(4000)])  # [4000, 3]
    assert (draws[:, 0] == 2).all() and (draws[:, 1] == 0).all()
    assert set(draws[:, 2].tolist()) == {1, 3}
    assert abs((draws[:, 2] == 3).float().mean().item() - 0.75) < 0.03
    assert (exponential_noise(torch.empty(10_000), gen) > 0).all()


class _Ops(TorchDispatchMode):
    """Records the aten ops run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_sample_token_reads_the_device_once():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    with _Ops() as ops:
        sample_token(logits, SamplingParams(temperature=0.7, top_k=50, top_p=0.9), new_generator(2))
    assert ops.names.count("aten._local_scalar_dense") == 1
    assert not {"aten.multinomial", "aten.nonzero", "aten.masked_select"} & set(ops.names)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (1e-40, 1.0), (1.0, 1e-300), (1e-300, 1e-300),
                                                (2.0, 1e-45)])
def test_extreme_parameters_give_a_finite_distribution(temperature, top_p):
    """Tiny temperatures and top_p are exact limits: all mass on the argmax, never NaN."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 1.0, 0.0, -5.0]])
    probs = processed_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert torch.isfinite(probs).all()
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    if top_p == 1.0:
        assert probs[1].tolist() == [0.5, 0.5, 0.0, 0.0]       # exact tie: split evenly, as the limit is


def test_subtracting_the_maximum_changes_nothing_at_ordinary_temperatures():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    x = logits / 0.7
    want = processed_probs(logits, params)
    assert torch.allclose(want.sum(-1), torch.ones(3))
    assert torch.allclose(processed_probs(x * 0.7 + 100.0, params), want, atol=1e-6)   # shift-invariant
