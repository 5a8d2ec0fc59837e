"""Pure-torch dequant + matmul: the test oracle for the Triton kernels and the CPU path of quant_matmul.

It follows the kernels' data flow (rotate x, gather x to kernel column order, multiply by the dequantized matrix in
kernel order, un-rotate the output, add the bias) in fp32, so a mismatch points at the kernel, not at the algebra;
the tests check separately that this equals x · dequantize(pl)ᵀ.
"""

from __future__ import annotations

import torch

from quantkit.formats import hadamard
from quantkit.formats.packed import PackedLinear, dequantize_kernel_order


def kernel_input(x: torch.Tensor, pl: PackedLinear, fast: bool = False) -> torch.Tensor:
    """x [M, K] -> the kernels' input [M, K]: x R_in (when rotated), then columns gathered by perm."""
    if pl.had_in is not None:
        rot = hadamard.rotate_fast if fast else hadamard.rotate
        x = rot(x, pl.had_in, pl.had_in_block).to(x.dtype)
    if pl.perm is not None:
        x = x.index_select(-1, pl.perm.to(device=x.device))  # int32 indices as stored: no cast per call
    return x


def reference_matmul(x: torch.Tensor, pl: PackedLinear) -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ + bias in fp32 math, returned in x's dtype."""
    k, n = pl.in_features, pl.out_features
    lead = x.shape[:-1]
    x2 = kernel_input(x.reshape(-1, k).float(), pl)  # [M, K]
    w = dequantize_kernel_order(pl)[:, :k].to(x.device)  # [N, K]
    y = x2 @ w.T  # [M, N]
    if pl.had_out is not None:
        y = hadamard.rotate(y, pl.had_out, pl.had_out_block, transpose=True)
    if pl.bias is not None:
        y = y + pl.bias.float()
    return y.to(x.dtype).reshape(*lead, n)
