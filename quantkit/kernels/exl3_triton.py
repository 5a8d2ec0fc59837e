"""Triton decode of EXL3 trellis tiles into Ŵ (formats/exl3.py's layout), the first of issue 27's EXL3 kernels.

One program per 16x16 tile: for each of its 256 stream positions i it reads the 16-bit window of the tile's cyclic
bitstream that ends at bit (i + 1) K (two stream words at most; stream word j is stored word j ^ 1), computes the
codebook value of that state in registers (3INST / MCG: a 32-bit multiply-add, mask and xor, then the two fp16
halves added in fp32; MUL1: a multiply, the sum of the four bytes, read as fp16, scaled and shifted in fp32) and
stores it at its tile cell in fragment order. The result equals the reference decoder bit for bit (tests, in
Triton's interpreter on CPU); the Hadamard transforms and scales of a whole weight follow in torch for now, and the
fused decode-GEMV / prefill matmul are the next kernels. TRITON_INTERPRET=1 must be set before Triton is imported
to run this on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.formats import exl3

BOOK_IDS = {"3inst": 0, "mcg": 1, "mul1": 2}


@triton.jit
def _decode_tiles(trellis, out, tiles_n, n_out, K: tl.constexpr, BOOK: tl.constexpr):
    tk = tl.program_id(0)
    tn = tl.program_id(1)
    words = trellis + (tk * tiles_n + tn) * (16 * K)
    i = tl.arange(0, 256)
    start = ((i + 1) * K - 16 + 256 * K) % (256 * K)  # first bit of the window, wrapping around
    w0 = start // 16
    w1 = (w0 + 1) % (16 * K)
    hi = tl.load(words + (w0 ^ 1)).to(tl.int32) & 0xFFFF
    lo = tl.load(words + (w1 ^ 1)).to(tl.int32) & 0xFFFF
    state = (((hi << 16) | lo) >> (16 - start % 16)) & 0xFFFF
    s = state.to(tl.uint32)
    if BOOK == 2:
        x = s * 0x83DCD12D
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF) + 0x6400
        value = total.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = tl.full([256], 0x1EEE, tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        shift = tl.full([256], 0xC931, tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = value * scale + shift
    else:
        if BOOK == 0:
            x = s * 89226354 + 64248484
        else:
            x = s * 0xCBAC1FED
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo_half = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi_half = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = lo_half + hi_half
    lane, j = i // 8, i % 8
    row = 2 * (lane % 4) + (j % 4 % 2) + 8 * (j % 4 // 2)
    col = lane // 4 + 8 * (j // 4)
    tl.store(out + (tk * 16 + row) * n_out + tn * 16 + col, value)


def decode_inner(trellis: torch.Tensor, book: str) -> torch.Tensor:
    """fp32 [in, out]: Ŵ decoded by the kernel (same contract as formats.exl3.decode_inner)."""
    k = exl3.bits_per_weight(trellis)
    tiles_k, tiles_n = trellis.shape[:2]
    out = torch.empty(tiles_k * 16, tiles_n * 16, dtype=torch.float32, device=trellis.device)
    _decode_tiles[(tiles_k, tiles_n)](trellis.contiguous(), out, tiles_n, tiles_n * 16, K=k, BOOK=BOOK_IDS[book])
    return out
