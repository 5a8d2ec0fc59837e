"""Convert throughput next to a plain `cp` of the same files, and the convert process's peak RSS.

Builds a synthetic Mistral-native checkpoint of about 5.8 GB (bf16, cached under --work), then in one run:
copies it with `cp`, converts it with quantkit in a fresh process that reports its own peak RSS, and prints
both throughputs, their ratio, and the RSS next to the bound (1.5 GB + the largest tensor).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from quantkit.io.checkpoint import native_weight_files
from quantkit.io.reader import TensorIndex
from quantkit.synthetic import PRESETS, write_synthetic_native

CONVERT = """
import resource, sys
from quantkit.convert.pipeline import convert
convert(sys.argv[1], sys.argv[2], progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "quantkit-bench" / "convert")
    ap.add_argument("--preset", default="bench-4gb", choices=sorted(PRESETS))
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args()

    src = args.work / f"{args.preset}-native"
    if not (src / "params.json").is_file():
        print(f"building {src} ...", flush=True)
        write_synthetic_native(src, PRESETS[args.preset], shard_bytes=2 * 10**9)
    index = TensorIndex(native_weight_files(src))
    total, largest = index.total_bytes, max(i.nbytes for i in index.infos.values())
    for out in ("cp-out", "convert-out"):
        shutil.rmtree(args.work / out, ignore_errors=True)

    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(args.work / "cp-out")], check=True)
    subprocess.run(["sync"], check=True)
    t_cp = time.perf_counter() - t

    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CONVERT, str(src), str(args.work / "convert-out")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    subprocess.run(["sync"], check=True)
    t_conv = time.perf_counter() - t
    rss = int(proc.stdout.strip().splitlines()[-1])
    bound = 1.5e9 + largest

    print(f"checkpoint: {total / 1e9:.2f} GB in {len(index.files)} files, largest tensor {largest / 1e6:.0f} MB")
    print("| step | seconds | GB/s |")
    print("|---|---|---|")
    print(f"| cp -r | {t_cp:.2f} | {total / t_cp / 1e9:.2f} |")
    print(f"| quantkit convert | {t_conv:.2f} | {total / t_conv / 1e9:.2f} |")
    print(f"convert / cp throughput ratio: {t_cp / t_conv:.2f}")
    print(f"convert peak RSS: {rss / 1e9:.2f} GB (bound 1.5 GB + largest tensor = {bound / 1e9:.2f} GB): "
          f"{'within' if rss < bound else 'OVER'}")  # fmt: skip
    if not args.keep:
        for out in ("cp-out", "convert-out"):
            shutil.rmtree(args.work / out, ignore_errors=True)


if __name__ == "__main__":
    main()
