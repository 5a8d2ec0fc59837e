"""GPTQModel's CPU decode, timed on request, for bench_runtime.py --real (the peer side of the quantized decode).

Runs in the interop venv (tests/interop/run_gptqmodel.sh makes it), not in quantkit's python:
    python benchmarks/peer_decode.py FOLDER [--backend torch] [--dtype bfloat16] [--threads 1]
Loads the GPTQ folder with GPTQModel on the CPU, prints one JSON line {"ready": true, "kernel": ..., ...}, then
answers each stdin line {"ids": [...], "k": n} with {"seconds": wall time of a greedy generate of exactly n new
tokens, "tokens": [...]}. The caller interleaves these requests with its own runs, so both sides see the same
background load. Nothing here is imported by quantkit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from gptqmodel import BACKEND, GPTQModel, __version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--backend", default="torch", help="a gptqmodel BACKEND value: torch, gptq_torch_aten, auto, ...")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = GPTQModel.load(args.folder, device="cpu", backend=BACKEND(args.backend), dtype=getattr(torch, args.dtype))
    hf = model.model.eval()
    hf.generation_config.eos_token_id = None  # always exactly k new tokens
    kernels = sorted({type(m).__name__ for m in hf.modules() if hasattr(m, "qweight")})
    info = {"ready": True, "kernel": kernels, "dtype": args.dtype, "gptqmodel": __version__, "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = torch.tensor([req["ids"]])
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=req["k"], min_new_tokens=req["k"],
                do_sample=False,
            )
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "tokens": out[0, ids.shape[1] :].tolist()}), flush=True)


if __name__ == "__main__":
    main()
