"""EXL3 trellis encoding on this machine: seconds per million weights and the squared error reached, at K = 2, 3, 4.

Encodes a random Gaussian matrix (scaled to the codebook's spread, as the Hadamard-rotated, scaled weights the
encoder sees are close to Gaussian) with quant/trellis.py and decodes it with formats/exl3.py; prints a markdown
table: weights, wall seconds, seconds per million weights, MSE relative to the targets' variance, and the same for a
plain round-to-nearest on a uniform grid of 2^K levels over ±3 sigma (what a scalar code of K bits gets, no scales).
Each row ends with the projection to Pixtral-Large's decoder (88 layers of q/k/v/o and gate/up/down, 121.8 B weights,
every width a multiple of 128 so nothing is padded) at that rate: one pass of `--bits K`. A `--bpw X` run first codes
each linear at every K up to X + 1.5 (its measurement: K = 1..4 for --bpw 3.0), then once more at the K chosen; the
last line prints what that costs against one `--bits K` pass, from the rates measured here (--k 1,...,8 measures
them all; a K not measured is priced at its nearest measured neighbour's rate). On a GPU (--device cuda) the forward
passes run in kernels/exl3_triton.py's Viterbi kernel.

    python benchmarks/bench_exl3_encode.py [--size 256] [--k 2,3,4] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from quantkit.formats import exl3
from quantkit.formats.registry import get_format
from quantkit.quant import trellis
from quantkit.quant.measure import measured_widths


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
    ap.add_argument("--k", default="2,3,4", help="the K to time, comma-separated")
    ap.add_argument("--bpw", type=float, default=3.0, help="the --bpw target whose measurement is priced")
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
    rates = {}
    for k in sorted(int(k) for k in args.k.split(",")):
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
        rates[k] = seconds / n
        print(f"| {k} | {seconds:.1f} | {seconds * 1e6 / n:.0f} | {mse:.4f} | {rtn:.4f} | {hours:,.0f} |")
    fmt = get_format("exl3")
    measured = measured_widths(fmt, args.bpw)
    near = {k: rates[min(rates, key=lambda m: (abs(m - k), m))] for k in fmt.widths}
    one = near[min(max(round(args.bpw), 1), 8)]  # a --bits pass at the K nearest the target
    every, window = sum(near.values()), sum(near[k] for k in measured)
    print(f"--bpw {args.bpw:g} --format exl3: its measurement codes each linear at K = {measured[0]}..{measured[-1]}, "
          f"{window / one:.1f}x one --bits {round(args.bpw)} pass (all eight K: {every / one:.1f}x); with the final "
          f"pass, {(window + one) / one:.1f}x")


if __name__ == "__main__":
    main()
