"""Load quantkit GPTQ exports with GPTQModel on CPU and compare its logits with quantkit's dequantized model.

Runs in the interop venv (GPTQModel installed), not in quantkit's python:
    python tests/interop/gptqmodel_logits.py GPTQ_DIR OURS.safetensors [GPTQ_DIR OURS.safetensors ...]
OURS holds {"ids", "logits", "weight.<module>"} from tests/interop/quantkit_logits.py (float32).

Each folder is loaded with GPTQModel.load(..., device="cpu", backend=BACKEND.TORCH, dtype=float16): the torch
kernel (TorchLinear) accepts only fp16/bf16, and fp16 holds the exported fp16 scales exactly. Then:
  - fp16: logits as loaded, for information (fp16 arithmetic alone moves them by ~1e-3 relative);
  - fp32: the same GPTQModel modules cast to float32 (model.float(): exact for the fp16 scales and the bf16/fp16
    embeddings and norms), so TorchLinear dequantizes and multiplies in fp32. Checked: every linear's
    dequantize_weight() against ours, and the logits: fro = ‖a − b‖ / ‖b‖ and max = max|a − b| / max|b|
    (a: GPTQModel, b: quantkit; weights: the worst linear's max). PASS when all are below --tol (default 1e-3).
Exits 1 if any folder fails. Driven by run_gptqmodel.sh.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
from gptqmodel import BACKEND, GPTQModel, __version__  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(‖a − b‖ / ‖b‖, max|a − b| / max|b|)."""
    return float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max())


def check(folder: str, ours: dict[str, torch.Tensor], tol: float) -> bool:
    model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    hf = model.model
    qlinears = {n: m for n, m in hf.named_modules() if hasattr(m, "qweight")}
    kernels = ",".join(sorted({type(m).__name__ for m in qlinears.values()}))
    ids, b = ours["ids"], ours["logits"]
    with torch.inference_mode():
        fp16 = hf(input_ids=ids).logits.float()
        hf.float()
        fp32 = hf(input_ids=ids).logits.float()
        w_err = max(rel(m.dequantize_weight().float().T, ours[f"weight.{n}"])[1] for n, m in qlinears.items())
    missing = sorted(k for k in ours if k.startswith("weight.") and k[7:] not in qlinears)
    print(f"{folder}: {len(qlinears)} quantized linears [{kernels}], weights: rel max {w_err:.3e}")
    if missing:
        print(f"  linears quantized by quantkit that GPTQModel did not load as quantized: {missing}")
    print("  fp16 as loaded: rel fro {:.3e}, rel max {:.3e} (information)".format(*rel(fp16, b)))
    fro, mx = rel(fp32, b)
    ok = fro < tol and mx < tol and w_err < tol and not missing
    print(f"  {'PASS' if ok else 'FAIL'} fp32: rel fro {fro:.3e}, rel max {mx:.3e} (tol {tol:g} on all three)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="GPTQ_DIR OURS.safetensors, repeated")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("arguments come in pairs: GPTQ_DIR OURS.safetensors")
    workers = os.environ["GPTQMODEL_CPU_WORKERS"]
    print(f"gptqmodel {__version__}, torch {torch.__version__}, GPTQMODEL_CPU_WORKERS={workers}")
    results = [
        check(folder, load_file(ours), args.tol) for folder, ours in zip(args.pairs[::2], args.pairs[1::2], strict=True)
    ]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
