"""Bit packing into int32 words: the bitstream both stored formats (quantkit planes, GPTQ qweight/qzeros) use.

`pack_bits` / `unpack_bits` write codes as one little-endian bitstream per line along a dim: code k of the line
occupies bits [k·b, (k+1)·b) of the stream, and stream bit j is bit (j mod 32) of word j // 32. For b ∈ {2, 4, 8}
that is 32/b codes per word, LSB first; for other widths codes straddle words (3-bit: 32 codes in 3 words, the
layout AutoGPTQ/GPTQModel use).
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, words) per repeating unit: the fewest codes that fill whole int32 words."""
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def pack_bits(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) along dim into int32 words: size n along dim becomes n·bits/32."""
    if not 1 <= bits <= 32:
        raise QuantkitError(f"cannot pack {bits}-bit codes")
    dim = dim % codes.dim()
    n = codes.shape[dim]
    per, words = _chunk(bits)
    if n % per:
        raise QuantkitError(f"{bits}-bit packing needs a multiple of {per} codes along dim {dim}, got {n}")
    x = codes.movedim(dim, -1)  # [..., n], in its own dtype: widened one code slot at a time below
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= 2**bits):
        raise QuantkitError(f"codes out of range for {bits} bits")
    x = x.reshape(*x.shape[:-1], n // per, per)  # [..., chunks, per]
    out = torch.zeros(*x.shape[:-1], words, dtype=torch.int64, device=codes.device)  # [..., chunks, words]
    for k in range(per):
        word, shift = divmod(k * bits, 32)
        v = x[..., k].to(torch.int64)
        out[..., word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code continues in the next word
            out[..., word + 1] |= v >> (32 - shift)
    out = out.reshape(*out.shape[:-2], -1)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # same 32 bits, signed container
    return out.movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pack_bits: int32 words along dim -> int32 codes in [0, 2^bits)."""
    if packed.dtype != torch.int32:
        raise QuantkitError(f"packed words must be int32, got {packed.dtype}")
    dim = dim % packed.dim()
    n_words = packed.shape[dim]
    per, words = _chunk(bits)
    if n_words % words:
        raise QuantkitError(f"{bits}-bit unpacking needs a multiple of {words} words along dim {dim}, got {n_words}")
    w = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # [..., n_words] as uint32
    w = w.reshape(*w.shape[:-1], n_words // words, words)  # [..., chunks, words]
    mask = 2**bits - 1
    cols = []
    for k in range(per):
        word, shift = divmod(k * bits, 32)
        v = w[..., word] >> shift
        if shift + bits > 32:
            v = v | (w[..., word + 1] << (32 - shift))
        cols.append(v & mask)
    out = torch.stack(cols, dim=-1).reshape(*w.shape[:-2], -1).to(torch.int32)  # [..., n]
    return out.movedim(-1, dim).contiguous()
