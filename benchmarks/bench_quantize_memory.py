"""Peak RSS of `quantkit quantize` on a synthetic 2 GB model, next to the bound: 1 GB plus one decoder layer.

Builds (and caches under --work) a random Mistral-native checkpoint of about 2 GB in bf16 with the real v3
tokenizer, converts it, then quantizes it in a fresh process that reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mistral_common

from quantkit.convert.pipeline import convert
from quantkit.synthetic import PRESETS, write_synthetic_native

TOKENIZER = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
QUANTIZE = """
import resource, sys
from quantkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    if e.code:
        raise
print("maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "quantkit-bench" / "quantize-memory")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the quantize process")
    args = ap.parse_args()

    params = PRESETS["bench-2gb"]
    native, hf, out = args.work / "native", args.work / "hf", args.work / "out"
    if not (native / "params.json").is_file():
        write_synthetic_native(native, params, tokenizer_file=TOKENIZER)
    if not (hf / "config.json").is_file():
        convert(native, hf, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.work / ".out.quantkit-work", ignore_errors=True)
    cmd = ["quantize", str(hf), str(out), "--bits", "4", "--group-size", "128", "--rows", str(args.rows),
           "--seq-len", str(args.seq_len), "--quiet"]  # fmt: skip
    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, "-c", QUANTIZE, *cmd], check=True, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("maxrss")))

    d, f, hd = params["dim"], params["hidden_dim"], params["head_dim"]
    layer = d * hd * (params["n_heads"] * 2 + params["n_kv_heads"] * 2) + 3 * d * f
    total = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    print(f"model: {total / 1e9:.2f} GB bf16, {params['n_layers']} layers of {layer * 2 / 1e6:.0f} MB (bf16), "
          f"{layer * 4 / 1e6:.0f} MB in the fp32 compute dtype")  # fmt: skip
    print(f"calibration: {args.rows} rows x {args.seq_len} tokens; quantize took {seconds:.0f} s")
    bound = 1e9 + layer * 4
    print(f"peak RSS: {rss / 1e9:.2f} GB; bound 1 GB + one fp32 layer = {bound / 1e9:.2f} GB: "
          f"{'within' if rss < bound else 'OVER'}")  # fmt: skip


if __name__ == "__main__":
    main()
