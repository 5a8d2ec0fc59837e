"""EXL3, ExLlamaV3's trellis-coded weights: the layout and a plain-torch reference decoder (issue 27).

A linear with `in` inputs and `out` outputs (both multiples of 128) stores its weight as W = diag(suh) H Ŵ H
diag(svh) in the [in, out] orientation (y = x W): H is the normalized Hadamard transform on blocks of 128, `suh`
[in] and `svh` [out] are fp16 signs times scales, and Ŵ [in, out] is trellis-coded at K bits per weight (K = 1..8),
with no group scales. Ŵ is cut into 16x16 tiles; tile (tk, tn) is `trellis[tk, tn]`, 16*K int16 words holding a
cyclic bitstream of 256*K bits: 32-bit little-endian pairs of words, so the stream reads word 1, word 0, word 3,
word 2, ..., each word from its top bit down. The weight at stream position i decodes from the 16-bit window of
the stream that ends at bit (i + 1) * K (wrapping around: tail-biting), looked up in a computed codebook of 2^16
values; stream positions map to tile cells in tensor-core fragment order (`fragment_order`).

Codebooks (which one a tensor uses is flagged by the presence of an `mcg` or `mul1` tensor; neither: 3INST):
  3inst  x = (s * 89226354 + 64248484) mod 2^32, then 0x3B603B60 ^ (x & 0x8FFF8FFF): the sum of its two fp16 halves
  mcg    the same with x = s * 0xCBAC1FED mod 2^32
  mul1   x = s * 0x83DCD12D mod 2^32; the sum of its four bytes plus 0x6400, read as fp16, times fp16(0x1EEE)
         plus fp16(0xC931)
Sums and products are in fp32, as GPTQModel's CPU decoder (`exl3_torch`) computes them; tests/test_exl3.py holds
its decoded weights for every codebook and K and checks this decoder against them bit for bit.
"""

from __future__ import annotations

import functools

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.hadamard import hadamard_matrix

CODEBOOKS = ("3inst", "mcg", "mul1")
DEFAULT_CODEBOOK = "mul1"  # what exllamav3's converter codes with unless told otherwise
SIGMA_REG = 0.025  # Hessian damping, a fraction of its mean diagonal (exllamav3's converter's default)
TILE = 16
HADAMARD_BLOCK = 128
MCG_MULT, MUL1_MULT = 0xCBAC1FED, 0x83DCD12D
FLAGS = {"mcg": MCG_MULT, "mul1": MUL1_MULT}  # codebook -> the multiplier its flag tensor holds
_INST3 = (89226354, 64248484)
_MASK, _BIAS = 0x8FFF8FFF, 0x3B603B60


def _half(bits: int) -> torch.Tensor:
    """The fp16 number with these 16 bits, as fp32."""
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(torch.float16).float()


def _fp16_pair_sum(x: torch.Tensor) -> torch.Tensor:
    """The two fp16 numbers packed in the low and high 16 bits of x (int64), added in fp32."""
    lo = (x & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16).float()
    hi = ((x >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16).float()
    return lo + hi


@functools.cache
def codebook(name: str) -> torch.Tensor:
    """fp32 [65536]: the value of every 16-bit trellis state."""
    s = torch.arange(1 << 16, dtype=torch.int64)
    if name in ("3inst", "mcg"):
        x = (s * _INST3[0] + _INST3[1]) if name == "3inst" else s * MCG_MULT
        return _fp16_pair_sum(((x & 0xFFFFFFFF) & _MASK) ^ _BIAS)
    if name == "mul1":
        x = (s * MUL1_MULT) & 0xFFFFFFFF
        total = sum((x >> shift) & 0xFF for shift in (0, 8, 16, 24)) + 0x6400
        value = total.to(torch.int32).to(torch.int16).view(torch.float16).float()
        return value * _half(0x1EEE) + _half(0xC931)
    raise QuantkitError(f"unknown EXL3 codebook {name!r} (expected one of {', '.join(CODEBOOKS)})")


@functools.cache
def fragment_order() -> torch.Tensor:
    """long [256]: the tile cell (row * 16 + column; row = input, column = output) of each stream position. Lane t
    of a tensor-core fragment holds rows 2(t % 4), +1, +8, +9 of column t // 4, then the same rows of column + 8."""
    cells = []
    for lane in range(32):
        r, c = 2 * (lane % 4), lane // 4
        cells += [(r + dr) * TILE + c + dc for dc in (0, 8) for dr in (0, 1, 8, 9)]
    return torch.tensor(cells)


def stream_bits(trellis: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 256 * K]: each tile's bitstream in stream order (the int16 words pairwise swapped, top bit
    first)."""
    words = trellis.to(torch.int32) & 0xFFFF
    words = words.view(*words.shape[:-1], -1, 2).flip(-1).flatten(-2)
    shifts = torch.arange(15, -1, -1, dtype=torch.int32, device=trellis.device)
    return ((words[..., None] >> shifts) & 1).to(torch.uint8).flatten(-2)


def pack_symbols(symbols: torch.Tensor, k: int) -> torch.Tensor:
    """int16 [..., 16 * K]: the trellis words of streams of 256 K-bit symbols [..., 256] (inverse of stream_bits)."""
    shifts = torch.arange(k - 1, -1, -1, device=symbols.device)
    bits = ((symbols.long()[..., None] >> shifts) & 1).flatten(-2)  # [..., 256 K], top bit first
    words = (bits.view(*bits.shape[:-1], -1, TILE) << torch.arange(15, -1, -1, device=symbols.device)).sum(-1)
    words = words.view(*words.shape[:-1], -1, 2).flip(-1).flatten(-2)
    return words.to(torch.int32).to(torch.int16)


def states(trellis: torch.Tensor) -> torch.Tensor:
    """long [tiles_k, tiles_n, 256]: the 16-bit state of every stream position, the window of the cyclic stream
    that ends at bit (i + 1) * K."""
    bits = stream_bits(trellis)
    n = bits.shape[-1]
    k = n // 256
    ends = (torch.arange(256, device=trellis.device) + 1) * k
    window = (ends[:, None] - TILE + torch.arange(TILE, device=trellis.device)) % n  # [256, 16] bit indices
    weights = 1 << torch.arange(15, -1, -1, device=trellis.device)
    return (bits[..., window].long() * weights).sum(-1)


def padded(n: int) -> int:
    """A dimension as EXL3 stores it: the next multiple of 128 (exllamav3 pads with zero weights)."""
    return -(-n // HADAMARD_BLOCK) * HADAMARD_BLOCK


def bits_per_weight(trellis: torch.Tensor) -> int:
    k, rem = divmod(trellis.shape[-1], TILE)
    if rem or not 1 <= k <= 8:
        raise QuantkitError(f"an EXL3 trellis has 16 * K words per tile (K = 1..8), not {trellis.shape[-1]}")
    return k


def decode_inner(trellis: torch.Tensor, book: str) -> torch.Tensor:
    """fp32 [in, out]: Ŵ, the trellis-coded matrix before the Hadamard transforms and scales."""
    bits_per_weight(trellis)
    tk, tn = trellis.shape[:2]
    values = codebook(book).to(trellis.device)[states(trellis)]  # [tk, tn, 256] in stream order
    tiles = torch.empty_like(values)
    tiles[..., fragment_order().to(trellis.device)] = values
    return tiles.view(tk, tn, TILE, TILE).permute(0, 2, 1, 3).reshape(tk * TILE, tn * TILE)


@functools.cache
def hadamard(n: int = HADAMARD_BLOCK, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix of order n (fp32, symmetric, its own inverse), made once per device."""
    if torch.device(device).type != "cpu":
        return hadamard(n).to(device)
    return hadamard_matrix(n) / n**0.5


def blocked_hadamard(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with H applied to every block of 128 along dim (0: H x, 1: x H)."""
    if x.shape[dim] % HADAMARD_BLOCK:
        raise QuantkitError(f"EXL3 needs dimensions divisible by {HADAMARD_BLOCK}, got {x.shape[dim]}")
    h = hadamard(device=x.device)
    if dim == 0:
        return (h @ x.reshape(-1, HADAMARD_BLOCK, x.shape[1])).reshape(x.shape)
    return (x.reshape(x.shape[0], -1, HADAMARD_BLOCK) @ h).reshape(x.shape)


def decode_weight(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, book: str) -> torch.Tensor:
    """fp32 [in, out]: W = diag(suh) H Ŵ H diag(svh), so that y = x W (transpose for nn.Linear's weight)."""
    w = blocked_hadamard(decode_inner(trellis, book), 0) * suh.float()[:, None]
    return blocked_hadamard(w, 1) * svh.float()[None, :]


def codebook_flag(book: str) -> dict[str, torch.Tensor]:
    """The tensor that marks a linear coded with `book`, as exllamav3 stores it: a scalar int32 holding the
    codebook's 32-bit multiplier (none for 3INST)."""
    if book not in FLAGS:
        return {}
    mult = FLAGS[book]
    return {book: torch.tensor(mult - (1 << 32) if mult >= 1 << 31 else mult, dtype=torch.int32)}


def symbol_states(symbols: torch.Tensor, k: int) -> torch.Tensor:
    """The 16-bit states [T, 256] of tail-biting K-bit symbol streams [T, 256]: each state is the previous one
    shifted left by K with its own symbol in the low K bits, the stream wrapping around."""
    state = torch.zeros_like(symbols)
    for j in range(-(-TILE // k)):
        state |= symbols.roll(j, dims=1) << (k * j)
    return state & 0xFFFF


def codebook_of(tensors: dict) -> str:
    """The codebook a stored linear uses: flagged by an `mcg` or `mul1` tensor, else 3INST."""
    return "mcg" if "mcg" in tensors else "mul1" if "mul1" in tensors else "3inst"
