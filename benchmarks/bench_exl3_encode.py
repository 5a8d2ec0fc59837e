"""EXL3 trellis encoding on this machine: seconds per million weights and the squared error reached, at K = 2, 3, 4.

Encodes a random Gaussian matrix (scaled to the codebook's spread, as the Hadamard-rotated, scaled weights the
encoder sees are close to Gaussian) with quant/trellis.py and decodes it with formats/exl3.py; prints a markdown
table: weights, wall seconds, seconds per million weights, MSE relative to the targets' variance, and the same for a
plain round-to-nearest on a uniform grid of 2^K levels over ±3 sigma (what a scalar code of K bits gets, no scales).
Each row ends with the projection to Pixtral-Large's decoder (88 layers of q/k/v/o and gate/up/down, 121.8 B weights,
every width a multiple of 128 so nothing is padded) at that rate: one pass of `--bits K`; a `--bpw` run codes each
linear at about three K first (its measurement), so it takes about four times as long. On a GPU (--device cuda)
the forward passes run in kernels/exl3_triton.py's Viterbi kernel.

    python benchmarks/bench_exl3_encode.py [--size 256] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from quantkit.formats import exl3
from quantkit.quant import trellis


def scalar_rtn(w: torch.Tensor, k: int) -> torch.Tensor:
    """Round to the nearest of 2^K evenly spaced levels over ±3 standard deviations."""
    span = 3 * float(w.std())
    step = 2 * span / ((1 << k) - 1)
    return (torch.round((w.clamp(-span, span) + span) / step) * step - span).clamp(-span, span)


PIXTRAL_LARGE_DECODER = 88 * (2 * 12288 * 12288 + 2 * 12288 * 1024 + 3 * 12288 * 28672)  # weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="the matrix is SIZE x SIZE (a multiple of 16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.size, args.size, generator=g) * exl3.codebook("3inst").std()).to(args.device)
    n = w.numel()
    where = torch.cuda.get_device_name() if w.is_cuda else f"{args.threads} CPU threads"
    print(f"{args.size} x {args.size} Gaussian weights ({n:,}), 3inst codebook, {where}, torch {torch.__version__}")
    print("| K | seconds | s per 1M weights | relative MSE (trellis) | relative MSE (scalar RTN, same K) "
          "| Pixtral-Large decoder, --bits K (hours) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for k in (2, 3, 4):
        if w.is_cuda:
            trellis.encode_matrix(w[:16], k)  # compile the kernels first
            torch.cuda.synchronize()
        start = time.perf_counter()
        code = trellis.encode_matrix(w, k)
        if w.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        mse = float(((exl3.decode_inner(code, "3inst") - w) ** 2).mean()) / float(w.var())
        rtn = float(((scalar_rtn(w, k) - w) ** 2).mean()) / float(w.var())
        hours = seconds / n * PIXTRAL_LARGE_DECODER / 3600
        print(f"| {k} | {seconds:.1f} | {seconds * 1e6 / n:.0f} | {mse:.4f} | {rtn:.4f} | {hours:,.0f} |")


if __name__ == "__main__":
    main()
