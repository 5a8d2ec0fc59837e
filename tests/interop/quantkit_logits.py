"""Logits of quantkit's own dequantized model, the reference for the GPTQModel interop check (main python).

Usage: python tests/interop/quantkit_logits.py FLOAT_SRC GPTQ_DIR OUT.safetensors [--tokens T] [--seed S]

Loads the float source model (float32, CPU), replaces every linear that GPTQ_DIR quantized with the weight
dequantized from the exported tensors, W = scales[g_idx]ᵀ·(q − zeros[g_idx]ᵀ) (docs/format.md), runs random token
ids [1, T] and saves {"ids", "logits", "weight.<module>" (dequantized [out, in])} to OUT. Run by run_gptqmodel.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.formats.gptq import gptq_unpack
from quantkit.model.load import load_model

PARTS = ("qweight", "qzeros", "scales", "g_idx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("gptq", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    qcfg = json.loads((args.gptq / "config.json").read_text())["quantization_config"]
    fmt = qcfg.get("checkpoint_format", "gptq")
    stored = {}
    for f in sorted(args.gptq.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            stored.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118

    model = load_model(args.src, device="cpu", dtype="float32", progress=False)
    weights = {}
    for name, mod in model.named_modules():
        key = name if name.startswith("lm_head") else f"model.{name}"
        if f"{key}.qweight" not in stored:
            continue
        q, scales, zeros, g_idx = gptq_unpack({p: stored[f"{key}.{p}"] for p in PARTS}, qcfg["bits"], fmt)
        g = g_idx.long()
        w = (scales.float()[g].T * (q - zeros[g].T).float()).contiguous()
        assert w.shape == mod.weight.shape, (key, w.shape, mod.weight.shape)
        mod.weight.data = w
        weights[f"weight.{key}"] = w
    if not weights:
        raise SystemExit(f"{args.gptq}: no quantized linear found")

    vocab = model.lm_head.weight.shape[0]
    ids = torch.randint(100, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        logits = model(ids).float()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids.contiguous(), "logits": logits.contiguous(), **weights}, str(args.out))
    print(f"{args.gptq.name}: dequantized {len(weights)} linears, logits {list(logits.shape)} -> {args.out}")


if __name__ == "__main__":
    main()
