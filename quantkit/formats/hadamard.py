"""Randomized block Hadamard rotation for `--rotate` models.

A rotation R = diag(s) · blockdiag(H_b / √b) (s a ±1 sign vector, H_b the Sylvester Hadamard matrix of a power of two
size b) is orthogonal, so y = x Wᵀ = (x R)(W R)ᵀ: the quantizer quantizes W R, whose columns are incoherent (no outlier
channel dominates a group), and the runtime rotates x the same way before the matmul. Only s and b are stored.

`rotate` is the plain butterfly (the test oracle); `rotate_fast` computes the same product as two small matmuls
(H_b = H_b1 ⊗ H_b2), which is what the GPU path uses: a handful of batched GEMMs instead of log2(b) elementwise passes.
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError


def block_size(n: int) -> int:
    """Largest power of two dividing n: the default Hadamard block for a dimension of size n."""
    if n < 1:
        raise QuantkitError(f"cannot rotate a dimension of size {n}")
    return n & -n


def random_signs(n: int, seed: int) -> torch.Tensor:
    """int8 [n] of ±1, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def hadamard_matrix(b: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Sylvester Hadamard matrix fp32 [b, b] with entries ±1 (unnormalized): H[i, j] = (-1)^popcount(i & j)."""
    _check_block(b)
    i = torch.arange(b, device=device)
    bits = (i[:, None] & i[None, :]).to(torch.int64)  # [b, b]
    parity = torch.zeros_like(bits)
    for shift in range(max(b.bit_length() - 1, 0)):
        parity ^= (bits >> shift) & 1
    return 1.0 - 2.0 * parity.to(torch.float32)


def _check_block(b: int) -> None:
    if b < 1 or b & (b - 1):
        raise QuantkitError(f"Hadamard block must be a power of two, got {b}")


def _check(x: torch.Tensor, signs: torch.Tensor, b: int) -> None:
    _check_block(b)
    n = x.shape[-1]
    if signs.shape != (n,):
        raise QuantkitError(f"rotation signs have shape {tuple(signs.shape)}, expected ({n},)")
    if n % b:
        raise QuantkitError(f"Hadamard block {b} does not divide the dimension {n}")


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dim (x @ H_b, H_b symmetric)."""
    b = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < b:
        y = x.reshape(*lead, b // (2 * h), 2, h)  # pairs (i, i + h) inside each block of 2h
        lo, hi = y[..., 0, :], y[..., 1, :]
        x = torch.stack((lo + hi, lo - hi), dim=-2).reshape(*lead, b)
        h *= 2
    return x


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int, transpose: bool = False) -> torch.Tensor:
    """x @ R (or x @ Rᵀ with transpose) along the last dim, in fp32: the reference butterfly."""
    _check(x, signs, block)
    n = x.shape[-1]
    s = signs.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    if not transpose:
        xf = xf * s
    y = _fwht(xf.reshape(*x.shape[:-1], n // block, block)).reshape(x.shape) / math.sqrt(block)
    return y * s if transpose else y


_H_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _cached_h(b: int, device: torch.device) -> torch.Tensor:
    key = (b, str(device))
    if key not in _H_CACHE:
        _H_CACHE[key] = hadamard_matrix(b, device=device) / math.sqrt(b)
    return _H_CACHE[key]


def rotate_fast(x: torch.Tensor, signs: torch.Tensor, block: int, transpose: bool = False) -> torch.Tensor:
    """Same result as `rotate`, as H_b1 · X · H_b2 on each block viewed as X [b1, b2] (b = b1·b2); fp32 math."""
    _check(x, signs, block)
    n = x.shape[-1]
    levels = block.bit_length() - 1
    b1, b2 = 1 << ((levels + 1) // 2), 1 << (levels // 2)
    s = signs.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    if not transpose:
        xf = xf * s
    v = xf.reshape(-1, n // block, b1, b2)  # [rows, blocks, b1, b2]
    y = torch.matmul(torch.matmul(_cached_h(b1, x.device), v), _cached_h(b2, x.device)).reshape(x.shape)
    return y * s if transpose else y
