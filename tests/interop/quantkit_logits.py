"""quantkit's side of the interop check (main python): its own loading of GPTQ exports, saved for the peers to match.

Usage: python tests/interop/quantkit_logits.py GPTQ_DIR OUT.safetensors [GPTQ_DIR OUT.safetensors ...]
       [--tokens T] [--new N] [--seed S]

For each folder: `load_quantized` (float32, torch backend: exactly what `quantkit run/eval` load) runs random token
ids [1, T] and continues them greedily for N tokens (one full forward per token, no cache); the weight of every
quantized linear is dequantized from the exported tensors, W = scales[g_idx]ᵀ·(q − zeros[g_idx]ᵀ) (docs/format.md),
under the exported module name. Saves {"ids", "logits", "greedy", "weight.<module>" ([out, in]), "bits.<module>"
(the bits quantkit allocated, from `dynamic`)} to OUT (float32). Vision models (Pixtral) also run an image + text
prompt: two random images of different sizes as [IMG] rows closed by [IMG_BREAK] / [IMG_END] ids, then text; saved
as "image.ids", "image.pixel_values" (padded, transformers' layout), "image.sizes" and "image.logits".
Run by run_gptqmodel.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.formats.gptq import gptq_unpack, module_bits
from quantkit.quantized_model import load_quantized

sys.path.insert(0, str(Path(__file__).parents[1]))
from native_models import image_prompt as image_prompt_ids  # noqa: E402  (tests/: 16-pixel patches, as here)

PARTS = ("qweight", "qzeros", "scales", "g_idx")


def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """ids [1, T] followed by `new` greedy tokens, one full forward each (as the peers run it)."""
    for _ in range(new):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


IMAGE_SIZES = ((64, 48), (32, 80))  # (height, width) in pixels: 4x3 and 2x5 patches of 16


def image_prompt(model, text: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """An image + text prompt for a vision model: ids, our images, and transformers' pixel_values / image_sizes."""
    # [IMG_BREAK] / [IMG_END] are ordinary token ids to both models: they only separate the rows of [IMG] slots
    tokens = {"img": model.config.image_token_id, "brk": 14, "end": 15}
    ids = image_prompt_ids(IMAGE_SIZES, tokens, text[0, :12].tolist())
    g = torch.Generator().manual_seed(seed + 1)
    images = [torch.randn(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    pixels = torch.zeros(len(images), 3, max(h for h, _ in IMAGE_SIZES), max(w for _, w in IMAGE_SIZES))
    for i, im in enumerate(images):
        pixels[i, :, : im.shape[1], : im.shape[2]] = im
    return {"ids": torch.tensor([ids]), "images": images, "pixel_values": pixels,
            "sizes": torch.tensor(IMAGE_SIZES)}  # fmt: skip


def reference(folder: Path, out: Path, tokens: int, new: int, seed: int) -> None:
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    fmt = qcfg.get("checkpoint_format", "gptq")
    stored = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            stored.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    weights = {}
    for key in sorted(k.removesuffix(".qweight") for k in stored if k.endswith(".qweight")):
        bits = module_bits(qcfg, key)  # per module from `dynamic` in --bpw builds
        q, scales, zeros, g_idx = gptq_unpack({p: stored[f"{key}.{p}"] for p in PARTS}, bits, fmt)
        g = g_idx.long()
        weights[f"weight.{key}"] = (scales.float()[g].T * (q - zeros[g].T).float()).contiguous()
        weights[f"bits.{key}"] = torch.tensor(bits)
    if not weights:
        raise SystemExit(f"{folder}: no quantized linear found")

    model = load_quantized(folder, device="cpu", dtype="float32", backend="torch", progress=False)
    ids = torch.randint(100, model.config.text.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(ids).float()
        cont = greedy(model, ids, new)[:, tokens:]
        vision = {}
        if model.config.vision is not None:
            prompt = image_prompt(model, ids, seed)
            vision = {"image.ids": prompt["ids"], "image.pixel_values": prompt["pixel_values"],
                      "image.sizes": prompt["sizes"], "image.logits": model(prompt["ids"], prompt["images"]).float()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": ids, "logits": logits, "greedy": cont, **weights, **vision}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    extra = " and an image + text prompt" if vision else ""
    print(f"{folder.name}: {len(weights)} quantized linears, logits {list(logits.shape)}{extra}, {new} greedy -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", type=Path, help="GPTQ_DIR OUT.safetensors, repeated")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("arguments come in pairs: GPTQ_DIR OUT.safetensors")
    torch.set_num_threads(2)
    for folder, out in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        reference(folder, out, args.tokens, args.new, args.seed)


if __name__ == "__main__":
    main()
