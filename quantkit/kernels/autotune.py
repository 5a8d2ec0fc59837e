"""Tune the kernels' launch configs on this GPU; saves configs/<gpu>.json (python -m quantkit.kernels.autotune).

For each row bucket (M = 1, 16, 256, 2048) every candidate launch is timed on Pixtral-Large's linear shapes at the
chosen bit widths and the one with the least total time wins. Runs once per GPU model, not at every start: the
runtime only reads the JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch

from quantkit.formats.packed import PackedLinear, Segment, plane_widths
from quantkit.kernels.config import BUCKETS, CONFIG_DIR, candidates, device_slug

SHAPES = [(12288, 12288), (12288, 1024), (12288, 28672), (28672, 12288)]  # (in, out)
def random_layer(n: int, k: int, bits: int, device: str | torch.device) -> PackedLinear:
    """Random words (every word is a valid set of codes), symmetric, G = 128, act order."""
    planes = [
        torch.randint(-(2**31), 2**31 - 1, (k * w // 32, n), dtype=torch.int32, device=device)
        for w in plane_widths(bits)
    ]
    scales = (torch.rand(k // 128, n, device=device) * 1e-3).half()
    return PackedLinear(k, n, 128, [Segment(bits, k, planes)], scales, None, torch.randperm(k, device=device).int())


def tune(
    shapes: list[tuple[int, int]],
    bits: list[int],
    buckets: dict[str, list[int]],
    timer: Callable[[Callable[[], object]], float],
    device: str | torch.device = "cuda",
    candidate_fn: Callable[[str, int], list[dict]] = candidates,
    log: Callable[[str], None] = print,
    check: Callable[[str, int, list[dict]], list[dict]] | None = None,
) -> dict:
    """{path: [entry per bucket, with max_m]} of the fastest candidates; timer(fn) returns ms.

    check(path, m, candidates) keeps the candidates fit for every bit width (main passes compile_check.usable for
    this GPU's arch): only those are timed, since the winner serves every width, not just the timed ones.
    """
    from quantkit.kernels.triton_dequant import triton_matmul

    layers = [random_layer(n, k, b, device) for (k, n), b in itertools.product(shapes, bits)]
    out: dict = {"skinny_max_m": max(buckets["skinny"])}
    for path, ms in buckets.items():
        out[path] = []
        for m in ms:
            best, best_t = None, float("inf")
            cands = candidate_fn(path, m)
            if check is not None:
                kept = check(path, m, cands)
                log(f"{path} M={m}: {len(kept)} of {len(cands)} candidates compile at every bit width")
                cands = kept
            for cand in cands:
                try:
                    total = 0.0
                    for pl in layers:
                        x = torch.randn(m, pl.in_features, device=device, dtype=torch.float16)
                        total += timer(lambda x=x, pl=pl, cand=cand: triton_matmul(x, pl, launch=cand))
                except Exception as e:  # a candidate the GPU cannot run (shared memory, registers): skip it
                    log(f"  skip {cand}: {type(e).__name__}")
                    continue
                if total < best_t:
                    best, best_t = cand, total
            if best is None:
                raise RuntimeError(f"no candidate ran for {path} M={m}")
            log(f"{path} M={m}: {best_t:.3f} ms total with {best}")
            out[path].append({"max_m": m, **best})
        out[path][-1]["max_m"] = None if path == "tiled" else out[path][-1]["max_m"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    ap.add_argument("--out", type=Path, help="output file (default: configs/<gpu>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("autotuning needs a CUDA GPU")
    import triton.testing

    from quantkit.kernels.compile_check import SMEM_LIMIT, usable

    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor if 10 * major + minor in SMEM_LIMIT else 90 if major >= 9 else 80

    def check(path: str, m: int, cands: list[dict]) -> list[dict]:
        return usable(path, m, cands, arch)

    timer = lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20)  # noqa: E731
    cfg = tune(SHAPES, args.bits, BUCKETS, timer, check=check)
    cfg["_note"] = f"tuned by quantkit.kernels.autotune on {name}, bits {args.bits}"
    out = args.out or CONFIG_DIR / f"{device_slug(name)}.json"
    out.write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
