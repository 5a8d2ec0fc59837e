"""Bit packing into int32 words, and the GPTQ checkpoint layout (`checkpoint_format: "gptq"`) built on it.

Naming rule: `pack_bits` / `unpack_bits` write codes as one little-endian bitstream per line along a dim: code k of
the line occupies bits [k·b, (k+1)·b) of the stream, and stream bit j is bit (j mod 32) of word j // 32. For
b ∈ {2, 4, 8} that is 32/b codes per word, LSB first; for other widths codes straddle words (3-bit: 32 codes in 3
words, the layout AutoGPTQ/GPTQModel use). The exact GPTQ tensors are specified in docs/format.md.
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError

GPTQ_BITS = (2, 3, 4, 8)  # widths the GPTQ checkpoint format defines (and its kernels load)
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 ("gptq") stores zero − 1 per field; GPTQModel's internal v2 the true zero


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


def _check_gptq(bits: int, fmt: str) -> None:
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"the GPTQ checkpoint format has {'/'.join(map(str, GPTQ_BITS))}-bit layouts, not {bits}")
    if fmt not in GPTQ_FORMATS:
        raise QuantkitError(f"unknown GPTQ checkpoint format {fmt!r} (expected one of {', '.join(GPTQ_FORMATS)})")


def gptq_pack(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Codes q [out, in], scales/zeros [n_groups, out], g_idx [in] -> the GPTQ tensors of one linear.

    Returns {"qweight": int32 [in·bits/32, out], "qzeros": int32 [n_groups, out·bits/32],
    "scales": fp16 [n_groups, out], "g_idx": int32 [in]}. in and out must be multiples of 32 (the loaders size
    their buffers as features // 32 · bits). In v1 each zero field holds (zero − 1) mod 2^bits.
    """
    _check_gptq(bits, checkpoint_format)
    n_out, n_in = q.shape
    if n_in % 32 or n_out % 32:
        raise QuantkitError(f"GPTQ export needs in and out features divisible by 32, got [{n_out}, {n_in}]")
    if scales.shape != zeros.shape or scales.shape[1] != n_out or g_idx.shape != (n_in,):
        raise QuantkitError("GPTQ export: scales/zeros must be [n_groups, out] and g_idx [in]")
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) & (2**bits - 1)
    return {
        "qweight": pack_bits(q.T, bits, dim=0),
        "qzeros": pack_bits(z, bits, dim=1),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def gptq_unpack(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors of one linear -> (q [out, in], scales fp16 [n_groups, out], zeros [n_groups, out], g_idx [in])."""
    _check_gptq(bits, checkpoint_format)
    q = unpack_bits(tensors["qweight"], bits, dim=0).T.contiguous()  # [out, in]
    zeros = unpack_bits(tensors["qzeros"], bits, dim=1)  # [n_groups, out]
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    return q, tensors["scales"], zeros, tensors["g_idx"]
