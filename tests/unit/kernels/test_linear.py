"""The skinny-input linear path agrees with F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.linear import SKINNY_MAX_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 9, SKINNY_MAX_ROWS, SKINNY_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x.view(1, rows, 48), w, b), F.linear(x, w, b).view(1, rows, 80),
                                   atol=1e-5, rtol=1e-5)


def test_module_keeps_linear_state_dict_and_grads():
    m = Linear(8, 4)
    assert set(m.state_dict()) == {"weight", "bias"}
    m(torch.randn(2, 8)).sum().backward()
    assert m.weight.grad is not None
