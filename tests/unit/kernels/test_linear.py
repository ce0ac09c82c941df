"""The prepacked oneDNN linear path agrees with F.linear and never serves a stale packed weight."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from kernels import linear as linear_module
from kernels.linear import PACKED_MAX_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [1, 2, 3, 9, 16, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("onednn", [True, False])
def test_matches_f_linear(rows, bias, onednn, monkeypatch):
    if onednn and not linear_module.onednn_available():
        pytest.skip("oneDNN not in this torch build")
    monkeypatch.setattr(linear_module, "_ONEDNN", onednn)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear(x.view(1, rows, 48), w, b), F.linear(x, w, b).view(1, rows, 80),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", sorted(linear_module.SINGLE_ROW))
def test_every_single_row_kernel_matches_f_linear(kernel):
    if kernel == "onednn" and not linear_module.onednn_available():
        pytest.skip("oneDNN not in this torch build")
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(1, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear_module.SINGLE_ROW[kernel](x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_single_row_kernel_is_timed_once_per_weight_shape(monkeypatch):
    monkeypatch.setenv(linear_module.SINGLE_ROW_ENV, "auto")
    picks: dict = {}
    monkeypatch.setattr(linear_module, "_single_row_pick", picks)
    timed = []
    pick = linear_module.pick_single_row
    monkeypatch.setattr(linear_module, "pick_single_row", lambda *a: timed.append(a[1].shape) or pick(*a))
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 40, generator=g), torch.randn(24, 40, generator=g)
    weights = (w, w.clone(), torch.randn(8, 40, generator=g))
    with torch.inference_mode():
        for weight in weights:
            torch.testing.assert_close(linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert timed == [(24, 40), (8, 40)]                                   # the second 24x40 weight reuses the pick
    assert set(picks) == {(24, 40), (8, 40)} and set(picks.values()) <= set(linear_module.SINGLE_ROW)


@pytest.mark.parametrize("rows", [1, 4, PACKED_MAX_ROWS + 1])
@pytest.mark.parametrize("onednn", [True, False])
def test_fp32_activations_times_bf16_weights(rows, onednn, monkeypatch):
    if onednn and not linear_module._ONEDNN_BF16:
        pytest.skip("no oneDNN bf16 kernels on this CPU or torch build")
    monkeypatch.setattr(linear_module, "_ONEDNN_BF16", onednn)
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(2, rows, 96, generator=g), torch.randn(80, 96, generator=g).bfloat16(), torch.randn(80)
    with torch.inference_mode():
        y = linear(x, w, b)                                                   # [2, rows, 80]
        exact = F.linear(x.bfloat16().float(), w.float(), b)                  # bf16 inputs, fp32 arithmetic
        assert y.dtype == torch.float32 and y.shape == (2, rows, 80)
        torch.testing.assert_close(y, exact, atol=0.05, rtol=0.01)          # bf16 output rounding at most
        half = linear(x.bfloat16(), w.float())                                # other mixes: weight cast to x's dtype
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half, F.linear(x.bfloat16(), w))


@pytest.mark.skipif(not linear_module.onednn_available(), reason="oneDNN not in this torch build")
def test_packed_weight_follows_changes_and_lifetime():
    x = torch.randn(3, 16)
    w = torch.randn(8, 16)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
        w.mul_(2.0)                                                   # in place: new _version
        torch.testing.assert_close(linear(x, w), F.linear(x, w))
        key = id(w)
        assert key in linear_module._packed
        del w
        gc.collect()
        assert key not in linear_module._packed                        # dropped with its weight
        for seed in range(20):                                         # fresh tensors may reuse ids / memory
            v = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(linear(x, v), F.linear(x, v))


def test_module_keeps_linear_state_dict_and_grads():
    m = Linear(8, 4)
    assert set(m.state_dict()) == {"weight", "bias"}
    m(torch.randn(2, 8)).sum().backward()
    assert m.weight.grad is not None


def test_a_named_single_row_kernel_serves_every_shape(monkeypatch):
    monkeypatch.setattr(linear_module, "_single_row_pick", {})
    x, w = torch.randn(1, 40), torch.randn(24, 40)
    with torch.inference_mode():
        monkeypatch.setenv(linear_module.SINGLE_ROW_ENV, "two_column")
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert linear_module._single_row_pick == {(24, 40): "two_column"}
        monkeypatch.setenv(linear_module.SINGLE_ROW_ENV, "fastest")
        with pytest.raises(ValueError, match="TREESPEC_SINGLE_ROW=fastest"):
            linear(x, torch.randn(8, 40))
