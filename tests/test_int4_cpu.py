"""The CPU int4 path of QuantLinear (aten's packed int4 kernel, bf16 activations) against the torch reference:
group sizes 32-256 and multiples of 32, act order, sym/asym, output features that are no multiple of 16, padded
input features, bias and rotations, GPTQ tensors with a desc_act g_idx; and the fallbacks where it cannot apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_packed import random_packed

from quantkit.formats.gptq import gptq_pack
from quantkit.formats.packed import dequantize
from quantkit.kernels import qlinear
from quantkit.kernels.qlinear import (
    INT4_ROWS,
    QuantLinear,
    gptq_to_packed,
    int4_kernel_available,
    int4_matmul,
    int4_pack,
)
from quantkit.kernels.reference import reference_matmul
from quantkit.quantized_model import pack_int4

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="aten's int4 CPU kernel is not vectorized here")
TOL = 1e-2  # max error / max |reference|: bf16 scales (2^-9) and the bf16 output (2^-9), far below one zero step


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


# (N, K, group size, act order, sym, rotation block): groups the kernel takes as they are (32-256) and multiples of
# 32 it takes as repeated 32/64-column groups (96, 192 = one group per row); N = 40 / 72 / 90 are no multiple of 16,
# K = 200 pads to 224
CASES = [
    (40, 200, 32, True, False, 0),
    (72, 256, 64, False, True, 0),
    (90, 512, 128, True, True, 0),
    (48, 512, 256, True, False, 0),
    (64, 384, 96, True, False, 0),
    (64, 192, 192, False, False, 0),
    (48, 256, 64, True, False, 32),
]


@pytest.mark.parametrize("n,k,gs,act,sym,rot", CASES)
def test_int4_path_equals_the_reference(n, k, gs, act, sym, rot):
    pl, _ = random_packed(n, k, 4, gs, act_order=act, sym=sym, seed=n + k, bias=True, rot_in=rot, rot_out=rot and 16)
    lin = QuantLinear(pl, backend="torch")
    keys = set(lin.state_dict())
    assert lin.keep_int4()
    assert set(lin.state_dict()) == keys  # the repack is not part of the checkpoint
    g = torch.Generator().manual_seed(k)
    for m in (1, 5, 17):
        x = torch.randn(2, m, k, generator=g).bfloat16()
        y = lin(x)
        assert y.shape == (2, m, n) and y.dtype == torch.bfloat16
        assert rel_err(y, reference_matmul(x.float(), pl)) <= TOL


def test_repack_in_slices_equals_one_piece(monkeypatch):
    """Slices of 64 output features (a bounded scratch) give the same packed weight; N = 200 pads the last one."""
    pl, _ = random_packed(200, 256, 4, 64, act_order=True, sym=False, seed=5)
    whole = int4_pack(pl)
    monkeypatch.setattr(qlinear, "CONVERT_ELEMENTS", 64 * 256)
    sliced = int4_pack(pl)
    assert torch.equal(sliced.weight, whole.weight) and torch.equal(sliced.scales_and_zeros, whole.scales_and_zeros)
    x = torch.randn(3, 256).bfloat16()
    assert rel_err(int4_matmul(x, pl, sliced), reference_matmul(x.float(), pl)) <= TOL


@pytest.mark.parametrize("gs,sym", [(32, False), (64, True), (128, False)])
def test_gptq_tensors_with_act_order(gs, sym):
    """Random GPTQ tensors (desc_act g_idx), loaded as GPTQModel writes them: the int4 path equals x · Wᵀ with
    W = s[g_idx] · (q − z[g_idx]) from the GPTQ rule."""
    gen = torch.Generator().manual_seed(gs)
    n, k = 160, 512
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.full((k // gs, n), 8) if sym else torch.randint(0, 16, (k // gs, n), generator=gen)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=gen)].int()
    tensors = gptq_pack(q, scales, zeros, g_idx, 4)
    lin = QuantLinear(gptq_to_packed(tensors, 4, sym=sym), backend="torch")
    assert lin.keep_int4()
    w = scales.float()[g_idx.long()].T * (q - zeros[g_idx.long()].T)  # [n, k]
    x = torch.randn(3, k, generator=gen).bfloat16()
    assert rel_err(lin(x), x.float() @ w.T) <= TOL


@pytest.mark.parametrize("bits,gs", [(3, 64), (8, 64), ([(4, 64), (3, 192)], 64), (4, 16), (4, None)], ids=str)
def test_layouts_the_kernel_cannot_take_fall_back(bits, gs):
    """Other widths, the quantkit format's mixed segments and groups under 32 keep the existing path; one group per
    row (None) runs on the kernel when the padded width is a multiple of 32 (here one 256-column group)."""
    pl, _ = random_packed(48, 256, bits, gs, act_order=True, sym=False, seed=3)
    lin = QuantLinear(pl, backend="torch")
    kept = lin.keep_int4()
    assert kept == (gs is None)  # per-channel over 256 columns is one 256-group: the kernel takes it
    x = torch.randn(4, 256).bfloat16()
    if kept:
        assert rel_err(lin(x), reference_matmul(x.float(), pl)) <= TOL
    else:
        assert torch.equal(lin(x), reference_matmul(x, pl))


def test_fp32_activations_and_prefill_keep_their_paths():
    """fp32 activations never take the int4 path (it would round them to bf16); above INT4_ROWS rows a kept bf16
    weight serves the prefill (the int4 kernel is slower there), at or below it the int4 kernel."""
    pl, _ = random_packed(64, 256, 4, 64, act_order=True, sym=False, bias=True)
    lin = QuantLinear(pl, backend="torch")
    assert lin.keep_int4()
    x32 = torch.randn(3, 256)
    assert torch.equal(lin(x32), reference_matmul(x32, pl))
    lin.keep_dense(torch.bfloat16)
    for m in (1, INT4_ROWS, INT4_ROWS + 1, 40):
        x = torch.randn(m, 256).bfloat16()
        want = int4_matmul(x, pl, lin._int4) if m <= INT4_ROWS else F.linear(x, lin._dense, pl.bias.bfloat16())
        assert torch.equal(lin(x), want)
    lin.keep_int4(False)
    assert lin.int4_bytes == 0


def test_pack_int4_follows_the_model_dtype():
    pl, _ = random_packed(64, 128, 4, 64, seed=1)
    model = torch.nn.Sequential(QuantLinear(pl, backend="torch"), torch.nn.LayerNorm(64))
    assert pack_int4(model) == 0  # fp32 model: kept dense fp32 weights stay exact
    model[1].to(torch.bfloat16)
    assert pack_int4(model) == 1
    assert model[0].int4_bytes < model[0].dense_bytes(torch.bfloat16) // 3
    assert pack_int4(model, enabled=False) == 0
    assert torch.equal(dequantize(model[0].packed), dequantize(pl))
