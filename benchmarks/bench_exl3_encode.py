"""EXL3 trellis encoding on this machine: seconds per million weights and the squared error reached, at K = 2, 3, 4.

Encodes a random Gaussian matrix (scaled to the codebook's spread, as the Hadamard-rotated, scaled weights the
encoder sees are close to Gaussian) with quant/trellis.py and decodes it with formats/exl3.py; prints a markdown
table: weights, wall seconds, seconds per million weights, MSE relative to the targets' variance, and the same for a
plain round-to-nearest on a uniform grid of 2^K levels over ±3 sigma (what a scalar code of K bits gets, no scales).

    python benchmarks/bench_exl3_encode.py [--size 256] [--threads N]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="the matrix is SIZE x SIZE (a multiple of 16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.size, args.size, generator=g) * exl3.codebook("3inst").std()
    n = w.numel()
    print(f"{args.size} x {args.size} Gaussian weights ({n:,}), 3inst codebook, {args.threads} threads, "
          f"torch {torch.__version__}")  # fmt: skip
    print("| K | seconds | s per 1M weights | relative MSE (trellis) | relative MSE (scalar RTN, same K) |")
    print("|---|---|---|---|---|")
    for k in (2, 3, 4):
        start = time.perf_counter()
        code = trellis.encode_matrix(w, k)
        seconds = time.perf_counter() - start
        mse = float(((exl3.decode_inner(code, "3inst") - w) ** 2).mean()) / float(w.var())
        rtn = float(((scalar_rtn(w, k) - w) ** 2).mean()) / float(w.var())
        print(f"| {k} | {seconds:.1f} | {seconds * 1e6 / n:.0f} | {mse:.4f} | {rtn:.4f} |")


if __name__ == "__main__":
    main()
