"""Quantized matmul speed on Pixtral-Large's linear shapes, next to a 16-bit torch matmul in the same run.

For each shape (in -> out features) and bit width, times quant_matmul (Triton) and torch's fp16 x @ Wᵀ at each batch
size, and prints ms, achieved GB/s (every stored byte of the packed weight plus activations and output, once per
call) and the fraction of the GPU's spec memory bandwidth. Decode (batch 1-16) is weight-bound, so that fraction is
the figure of merit; issue 7 aims at ≥ 70%. Weights are random (speed does not depend on values); act order is on,
so the activation gather is timed too. With --exl3 K ..., EXL3 linears (trellis-coded at K bits, random codes and
scales; kernels/exl3_triton.py: the fused GEMV up to 16 rows, decode + fp16 matmul above) get rows of their own,
their stored bytes being the trellis and the two fp16 scale vectors. Without a GPU it runs a small correctness pass
in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

SHAPES = [(12288, 12288), (12288, 1024), (12288, 28672), (28672, 12288)]  # (in, out): q/o, k/v, gate/up, down
BITS = ["2", "3", "4", "5", "6", "8", "4+3"]  # "4+3": first 1/8 of the input columns (≥ 128) at 4 bits, rest at 3
SPEC_GBPS = {  # spec HBM/GDDR bandwidth by substring of torch.cuda.get_device_name().lower(); first match wins
    "h200": 4800,
    "h100 nvl": 3900,
    "h100 pcie": 2000,
    "h100": 3350,
    "gh200": 4000,
    "a100-sxm4-80gb": 2039,
    "a100 80gb pcie": 1935,
    "a100-pcie-80gb": 1935,
    "a100": 1555,
    "l40s": 864,
    "l4": 300,
    "a10g": 600,
    "a10": 600,
    "rtx 4090": 1008,
    "rtx 3090 ti": 1008,
    "rtx 3090": 936,
}


def layout_of(spec: str, k: int) -> list[tuple[int, int]]:
    if "+" not in spec:
        return [(int(spec), k)]
    hi, lo = (int(b) for b in spec.split("+"))
    head = max(k // 8 // 128 * 128, 128)
    return [(hi, head), (lo, k - head)]


def random_packed(n: int, k: int, spec: str, group_size: int, device: str):
    """A PackedLinear with random words (every int32 word is a valid set of codes) and act order."""
    from quantkit.formats.packed import PackedLinear, Segment, plane_widths

    segments = []
    for bits, cols in layout_of(spec, k):
        planes = [
            torch.randint(-(2**31), 2**31 - 1, (cols * w // 32, n), dtype=torch.int32, device=device)
            for w in plane_widths(bits)
        ]
        segments.append(Segment(bits, cols, planes))
    scales = (torch.rand(k // group_size, n, device=device) * 1e-3).half()
    perm = torch.randperm(k, device=device).to(torch.int32)
    return PackedLinear(k, n, group_size, segments, scales, None, perm)


def random_exl3(n: int, k: int, bits: int, device: str):
    """An Exl3Linear [n, k] on the Triton backend with random trellis words and scales."""
    from quantkit.kernels.exl3_linear import Exl3Linear

    tensors = {
        "trellis": torch.randint(-(1 << 15), 1 << 15, (k // 16, n // 16, 16 * bits), dtype=torch.int32).to(torch.int16),
        "suh": (torch.rand(k) + 0.5).half(),
        "svh": (torch.rand(n) - 0.5).half() / k**0.5,
    }
    lin = Exl3Linear({a: t.to(device) for a, t in tensors.items()}, n, k, "3inst")
    lin.set_backend("triton")
    return lin


def spec_bandwidth(name: str) -> float | None:
    low = name.lower()
    for key, gbps in SPEC_GBPS.items():
        if key in low:
            return float(gbps)
    return None


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write of 1 GiB)."""
    import triton.testing

    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=50)
    return 2 * a.numel() / ms / 1e6


def bench_gpu(args: argparse.Namespace) -> None:
    import triton.testing

    from quantkit.formats import stored_bits
    from quantkit.kernels import quant_matmul

    name = torch.cuda.get_device_name()
    peak = spec_bandwidth(name)
    copy = copy_bandwidth()
    bw = peak or copy
    print(f"device: {name}; spec bandwidth {peak or 'unknown'} GB/s; measured copy {copy:.0f} GB/s")
    print(f"fractions are of {'spec' if peak else 'measured copy'} bandwidth; group size {args.group_size}, act order")
    timer = triton.testing.do_bench_cudagraph if args.graphs else triton.testing.do_bench
    head = f"{'in->out':>13} {'M':>5} {'bits':>4} | {'ms':>8} {'GB/s':>7} {'%BW':>5} | {'fp16 ms':>8} {'GB/s':>7}"
    print(head + f" {'%BW':>5} | {'speedup':>7}")
    for k, n in args.shapes:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in args.batch:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            act_bytes = (m * k + m * n) * 2
            t16 = timer(lambda x=x, w=w16: torch.nn.functional.linear(x, w))
            gb16 = (n * k * 2 + act_bytes) / t16 / 1e6
            for spec in args.bits:
                pl = random_packed(n, k, spec, args.group_size, "cuda")
                tq = timer(lambda x=x, pl=pl: quant_matmul(x, pl, backend="triton"))
                gbq = (stored_bits(pl) / 8 + act_bytes) / tq / 1e6
                row = f"{k:>6}->{n:<6} {m:>5} {spec:>4} | {tq:8.4f} {gbq:7.0f} {gbq / bw:5.0%} | {t16:8.4f} {gb16:7.0f}"
                print(row + f" {gb16 / bw:5.0%} | {t16 / tq:6.2f}x", flush=True)
                del pl
            for bits in args.exl3:
                lin = random_exl3(n, k, bits, "cuda")
                tq = timer(lambda x=x, lin=lin: lin(x))
                gbq = (lin.trellis.numel() * 2 + (k + n) * 2 + act_bytes) / tq / 1e6
                row = f"{k:>6}->{n:<6} {m:>5} {'e' + str(bits):>4} | {tq:8.4f} {gbq:7.0f} {gbq / bw:5.0%} | {t16:8.4f}"
                print(row + f" {gb16:7.0f} {gb16 / bw:5.0%} | {t16 / tq:6.2f}x", flush=True)
                del lin
        torch.cuda.empty_cache()


def correctness_pass(args: argparse.Namespace) -> int:
    """Tiny shapes through the Triton interpreter against the torch reference; returns the number of failures."""
    from quantkit.kernels.reference import reference_matmul
    from quantkit.kernels.triton_dequant import triton_matmul

    failures = 0
    for spec in args.bits:
        pl = random_packed(96, 256, spec, 64, "cpu")
        for m in (1, 17):
            x = torch.randn(m, 256, dtype=torch.float16)
            y, ref = triton_matmul(x, pl).float(), reference_matmul(x, pl).float()
            err = float((y - ref).abs().max() / ref.abs().max())
            ok = err < 3e-3
            failures += not ok
            print(f"bits {spec:>4} M={m:<3} max relative error {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    for bits in args.exl3:  # the Triton path (GEMV, decode + matmul) against the plain-torch decode
        lin = random_exl3(384, 256, bits, "cpu")
        ref_lin = copy.deepcopy(lin)
        ref_lin.set_backend("torch")
        for m in (1, 17):
            x = torch.randn(m, 256)
            y, ref = lin(x), ref_lin(x)
            err = float((y - ref).abs().max() / ref.abs().max())
            ok = err < 1e-4
            failures += not ok
            print(f"exl3 K={bits} M={m:<3} max relative error {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return failures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", nargs="+", default=BITS, help="widths, or HI+LO for a mixed matrix (default: all)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16], help="rows M (default: 1 16)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--shape", nargs=2, type=int, action="append", dest="shapes", metavar=("IN", "OUT"))
    ap.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    ap.add_argument("--exl3", nargs="*", type=int, default=[], metavar="K", help="also EXL3 linears at these K")
    args = ap.parse_args()
    args.shapes = args.shapes or SHAPES
    if torch.cuda.is_available():
        bench_gpu(args)
        return
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    print("no CUDA GPU: correctness pass in the Triton interpreter (tiny shapes); speed needs a GPU")
    sys.exit(1 if correctness_pass(args) else 0)


if __name__ == "__main__":
    main()
