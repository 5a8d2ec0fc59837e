"""The EXL3 encoder on one H100, projected without one: how long Pixtral-Large's decoder takes to code (issue 27).

No GPU is needed. The encoder's Viterbi forward kernel (kernels/exl3_triton.py) is compiled for sm_90 with Triton's
real compiler (as kernels/compile_check.py does), and its SASS is read: the instructions one warp issues per
trellis step are those of the step loop, with a loop nested in it (the 65536 / VITERBI_BLOCK blocks of states, where
ptxas kept it a loop) counted that many times. A tile's pass is 256 steps of every warp of its program, a linear's
coding two passes per tile (tail-biting); Pixtral-Large's decoder has 121.8 B weights, 476 M tiles of 256. The
projection divides the warp instructions by what an H100 SXM issues at most (132 SMs x 4 schedulers x one
instruction per clock at 1.98 GHz): a lower bound on the time, reached only if no warp ever waits. The way back (one
thread per tile, 256 steps) and the LDLQ updates are left out. The memory each pass writes (a byte per state suffix
and step) is priced at 3.35 TB/s beside it.

    python benchmarks/exl3_encode_projection.py [--k 1,2,3,4] [--book mul1] [--bpw 3.0]
"""

from __future__ import annotations

import argparse
import os
import re

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the compiler
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set only to silence its warning

import torch  # noqa: E402

from quantkit.kernels import compile_check, exl3_triton  # noqa: E402
from quantkit.quant.measure import measured_widths  # noqa: E402

PIXTRAL_LARGE_DECODER = 88 * (2 * 12288 * 12288 + 2 * 12288 * 1024 + 3 * 12288 * 28672)  # weights
H100_ISSUE = 132 * 4 * 1.98e9  # warp instructions per second: SMs x schedulers x boost clock
H100_BYTES = 3.35e12  # HBM3, bytes per second


def step_instructions(sass: str) -> int:
    """Warp instructions of one trellis step: the step loop (the outermost backward branch), a loop inside it
    counted once per block of states."""
    lines = [line.split("\t", 1)[-1].strip() for line in sass.splitlines()]
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.fullmatch(r"\.?L\w+:", line)}
    loops = sorted(((labels[m.group(1)], i) for i, line in enumerate(lines)
                    if (m := re.search(r"\bBRA\s+`?\(?(\.?L\w+)", line)) and labels.get(m.group(1), i) < i - 1),
                   key=lambda loop: loop[0] - loop[1])  # fmt: skip

    def count(first: int, branch: int) -> int:  # instructions from a loop's label to its branch back
        return sum(1 for line in lines[first : branch + 1] if line and not line.endswith(":"))

    outer = loops[0]
    inner = [loop for loop in loops[1:] if outer[0] < loop[0] and loop[1] < outer[1]]
    return count(*outer) + sum(count(*loop) for loop in inner) * ((1 << 16) // exl3_triton.VITERBI_BLOCK - 1)


def compiled_sass(k: int, book: str) -> str:
    """The SASS of the forward kernel at K for sm_90, as the encoder launches it (no start state)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    case = dict(sweep="exl3", config="-", bits=k, book=book, m=False, path="viterbi", dtype=torch.float32)
    kernels = compile_check.capture(90, [case])
    spec = next(v["spec"] for v in kernels.values() if v["spec"]["kernel"] == "exl3_viterbi")
    src = ASTSource(compile_check._kernel(spec["kernel"]), spec["signature"], spec["constexprs"], spec["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"]).asm["sass"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="1,2,3,4", help="the K to project, comma-separated")
    ap.add_argument("--book", default="mul1", help="codebook (mul1: the default)")
    ap.add_argument("--bpw", type=float, default=3.0, help="the --bpw target whose run is priced")
    args = ap.parse_args()
    tile_passes = 2 * PIXTRAL_LARGE_DECODER // 256
    warps = exl3_triton.VITERBI_WARPS
    print(f"Pixtral-Large decoder ({PIXTRAL_LARGE_DECODER / 1e9:.1f} B weights, {tile_passes // 2 / 1e6:.0f} M "
          f"tiles), {args.book}, sm_90 SASS, {warps} warps per tile, H100 SXM at {H100_ISSUE / 1e12:.3f} T warp "
          "instructions/s")  # fmt: skip
    print("| K | SASS per step (one warp) | per state and step | --bits K pass, issue bound (h) | its writes (h) |")
    print("|---|---|---|---|---|")
    hours = {}
    for k in sorted(int(k) for k in args.k.split(",")):
        per_step = step_instructions(compiled_sass(k, args.book))
        issue = tile_passes * 256 * per_step * warps / H100_ISSUE / 3600
        writes = tile_passes * 256 * ((1 << 16) >> k) / H100_BYTES / 3600
        hours[k] = issue
        print(f"| {k} | {per_step} | {per_step * 32 * warps / (1 << 16):.1f} | {issue:.2f} | {writes:.2f} |")
    measured = measured_widths("exl3", args.bpw)
    if all(k in hours for k in measured) and round(args.bpw) in hours:
        total = sum(hours[k] for k in measured) + hours[round(args.bpw)]
        print(f"--bpw {args.bpw:g}: measurement at K = {measured[0]}..{measured[-1]} and a final pass at about K = "
              f"{round(args.bpw)}: {total:.1f} h at the issue bound")  # fmt: skip


if __name__ == "__main__":
    main()
