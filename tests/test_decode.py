"""The CPU decode path: kept dequantized weights, the backend resolved once, the static-cache decode step and its
on-device sampling, and the per-layer launch count."""

from __future__ import annotations

import pytest
import torch
from test_packed import random_packed
from torch import nn

from quantkit.kernels import qlinear
from quantkit.kernels.qlinear import QuantLinear
from quantkit.kernels.reference import reference_matmul
from quantkit.runtime import keep_dequantized, set_backend


@pytest.mark.parametrize("bits,act,rot", [(4, True, 0), (3, False, 32), ((5, 128), True, 0)])
def test_kept_weight_gives_the_reference_output(bits, act, rot):
    layout = [(5, 128), (3, 128)] if isinstance(bits, tuple) else bits
    pl, _ = random_packed(48, 256, layout, 64, act_order=act, bias=True, rot_in=rot, rot_out=rot and 16)
    lin = QuantLinear(pl, backend="torch")
    keys = set(lin.state_dict())
    x = torch.randn(3, 5, 256)
    ref = reference_matmul(x, pl)
    lin.keep_dense(torch.float32)
    assert lin.has_dense
    y = lin(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert set(lin.state_dict()) == keys  # the kept weight is not part of the checkpoint
    lin.keep_dense(None)
    assert not lin.has_dense
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)


def test_backend_is_resolved_once_not_per_forward(monkeypatch):
    pl, _ = random_packed(32, 64, 4, 32)
    lin = QuantLinear(pl, backend="auto")
    calls = []
    real = qlinear.resolve_backend
    monkeypatch.setattr(qlinear, "resolve_backend", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 64)
    for _ in range(4):
        lin(x)
    assert len(calls) == 1
    lin.to("cpu")  # a move re-resolves (once)
    lin(x)
    lin(x)
    assert len(calls) == 2


def test_keep_dequantized_respects_the_budget_and_the_flag(monkeypatch):
    model = nn.Sequential(*(QuantLinear(random_packed(64, 128, 4, 64, seed=i)[0], backend="torch") for i in range(3)))
    model.append(nn.LayerNorm(64))
    assert set_backend(model, "torch") == 3
    one = model[0].dense_bytes(torch.float32)
    monkeypatch.setattr("quantkit.runtime.available_memory", lambda device: 2 * one + one // 2)
    assert keep_dequantized(model, fraction=1.0) == 2  # the third does not fit
    assert [m.has_dense for m in model[:3]] == [True, True, False]
    x = torch.randn(2, 128)
    for m in model[:3]:
        torch.testing.assert_close(m(x), reference_matmul(x, m.packed), rtol=1e-5, atol=1e-5)
    assert keep_dequantized(model, enabled=False) == 0
    assert not any(m.has_dense for m in model[:3])
