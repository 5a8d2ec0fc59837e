"""Quantize a float model with GPTQModel on CPU, the peer quantizer for bench_quality.py (issue 8).

Runs in the interop venv (tests/interop/run_gptqmodel.sh makes it), not in quantkit's python:
    python benchmarks/peer_gptqmodel.py SRC CALIB.safetensors OUT [--bits 4] [--group-size 128] [--desc-act]
        [--sym] [--damp 0.01] [--mse 2.4]
SRC is a float folder from `quantkit convert`; CALIB holds one int64 tensor "ids" [rows, seq_len], the exact rows
quantkit calibrated on, passed to GPTQModel as-is (no concatenation or re-tokenization). GPTQ settings follow
quantkit's: true sequential, no group-aware reordering (act_group_aware=False, which GPTQModel would otherwise turn
on without desc_act), lm_head kept in float; its clipping search is off as GPTQModel's default (quantkit searches by
default; --mse 2.4 runs GPTQModel's equivalent). OUT is a GPTQ-format folder (checkpoint_format "gptq") that
quantkit.quantized_model.load_quantized loads. Prints one JSON line on stdout as its last line: {"seconds":
quantize() wall time (load and save excluded), "bits", "group_size", "desc_act", "sym", "damp", "mse",
"peak_rss_gb" (this process's peak resident memory, or its children's if larger), ...}.
Driven by benchmarks/peer.py:run_gptqmodel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig, __version__  # noqa: E402
from gptqmodel.models.base import BaseQModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def peak_rss_gb() -> float:
    """Peak resident memory of this process (or of its worker processes, if one of them peaked higher), in GB."""
    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    return max(resource.getrusage(w).ru_maxrss for w in who) * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1: per channel")
    ap.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sym", action="store_true", default=True)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--damp", type=float, default=0.01, help="damp_percent: fraction of mean diag(H)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mse", type=float, default=0.0, help="GPTQModel's clipping search norm (0: off, its default)")
    args = ap.parse_args()

    ids = load_file(args.calib)["ids"].long()
    calib = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in ids]
    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        act_group_aware=False,
        sym=args.sym,
        damp_percent=args.damp,
        mse=args.mse,
        true_sequential=True,
        format="gptq",
        offload_to_disk=False,
    )
    model = GPTQModel.load(args.src, qcfg, device="cpu", dtype=getattr(torch, args.dtype))
    if type(model).prepare_dataset is not BaseQModel.prepare_dataset:
        # Llava's definition re-renders chat conversations through its processor; these rows are token ids already
        model.prepare_dataset = types.MethodType(BaseQModel.prepare_dataset, model)
    start = time.perf_counter()
    model.quantize(calib, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - start
    # Kept tensors (embeddings, norms, lm_head) go back to the source dtype, as quantkit stores them; scales stay fp16.
    keep = getattr(torch, json.loads((Path(args.src) / "config.json").read_text()).get("torch_dtype", "bfloat16"))
    for p in model.model.parameters():
        p.data = p.data.to(keep)
    model.model.config.dtype = keep
    model.save(args.out)
    result = {
        "seconds": round(seconds, 3),
        "bits": args.bits,
        "group_size": args.group_size,
        "desc_act": args.desc_act,
        "sym": args.sym,
        "damp": args.damp,
        "mse": args.mse,
        "rows": ids.shape[0],
        "seq_len": ids.shape[1],
        "dtype": args.dtype,
        "gptqmodel": __version__,
        "torch": torch.__version__,
        "workers": os.environ["GPTQMODEL_CPU_WORKERS"],
        "peak_rss_gb": peak_rss_gb(),
    }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
