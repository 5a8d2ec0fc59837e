"""Load a quantkit `--format exl3` folder with GPTQModel's CPU EXL3 kernel (BACKEND.EXL3_TORCH) and compare its
logits with quantkit's (issue 27, must-show 1). Runs in the interop venv (tests/interop/run_gptqmodel.sh makes it):

    python -c 'import torch; ...'  # quantkit's side: OURS = {"ids": [1, T], "logits": [1, T, V]} in fp32
    ~/.cache/quantkit-interop/venv/bin/python tests/interop/exl3_gptqmodel.py EXL3_DIR OURS.safetensors [--tol 1e-3]

Prints ‖a − b‖ / ‖b‖ of the logits and how many of quantkit's 16 greedy tokens GPTQModel repeats (one full forward
per token); exits 1 above --tol or when a token differs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from gptqmodel import BACKEND, GPTQModel
from safetensors.torch import load_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("ours")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    ours = load_file(args.ours)
    try:  # its CPU kernel runs linears of >= 2^19 weights (a head) on oneDNN's BF16x3 matmul (3e-3 off): compare
        from gptqmodel.nn_modules import exllamav3_torch  # the decoding, in fp32 as quantkit's reference runs

        exllamav3_torch._cpu_bf16x3_should_use = lambda *shape: False
    except (ImportError, AttributeError):
        pass
    model = GPTQModel.load(args.folder, device="cpu", backend=BACKEND.EXL3_TORCH, dtype=torch.float32)
    exl3 = [n for n, m in model.model.named_modules() if type(m).__name__ == "ExllamaV3TorchLinear"]
    ids, want = ours["ids"], ours["greedy"]
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
        for _ in range(want.shape[1]):
            ids = torch.cat([ids, model.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    rel = float((logits - ours["logits"]).norm() / ours["logits"].norm())
    same = int((ids[:, ours["ids"].shape[1] :] == want).sum())
    print(f"{args.folder}: {len(exl3)} EXL3 modules in GPTQModel; logits rel. difference {rel:.2e}; "
          f"greedy tokens equal {same}/{want.shape[1]}")  # fmt: skip
    return 0 if rel <= args.tol and exl3 and same == want.shape[1] else 1


if __name__ == "__main__":
    sys.exit(main())
