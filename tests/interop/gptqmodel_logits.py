"""Load quantkit GPTQ exports with GPTQModel and with transformers on CPU and compare them with quantkit's loading.

Runs in the interop venv (GPTQModel, optimum installed), not in quantkit's python:
    python tests/interop/gptqmodel_logits.py GPTQ_DIR OURS.safetensors [GPTQ_DIR OURS.safetensors ...]
OURS holds {"ids", "logits", "greedy", "weight.<module>"} from tests/interop/quantkit_logits.py (float32).

Each folder is loaded by each peer in float16 on CPU (GPTQModel: BACKEND.TORCH, whose TorchLinear takes only
fp16/bf16; transformers: from_pretrained through optimum + gptqmodel, output_loading_info=True), then cast to float32
(model.float(): exact for the fp16 scales), so the peer dequantizes and multiplies in fp32. Checked per peer:
  - every linear quantkit quantized is a quantized module of the peer under the same name, and no other;
  - each such module's bits (GPTQModel resolves them from quantization_config.dynamic) equal quantkit's;
  - weights: each module's dequantize_weight() against ours, worst max|a − b| / max|b|;
  - logits on the same ids: ‖a − b‖ / ‖b‖ and max|a − b| / max|b| below --tol;
  - 16 greedy tokens (one full forward per token, no cache) equal to quantkit's;
  - Pixtral: the vision tower and projector are plain (unquantized) modules of the peer, and the logits of an
    image + text prompt (pixel_values / image_sizes as transformers takes them) match quantkit's within --tol;
  - the load report (transformers: missing and unexpected keys; a non-empty one is a misload).
transformers 5 is known to misload a GPTQ Mixtral (its experts are fused 3-D tensors with no GPTQ form: the quantized
expert tensors end up UNEXPECTED, the fused weights MISSING and random, with no error); that row must show the misload
(README and the exported model card say so) and is reported as "known misload", not as a pass. transformers also
refuses mixed-bit folders (per-module bits in `dynamic`: it builds every module at the top-level `bits`, so the
shapes do not match); that load error is reported as "known refusal".
One peer per process (--peer): GPTQModel.load patches transformers' MoE modules (its Defuser dependency splits the
fused experts back into per-expert linears), after which transformers loads a GPTQ Mixtral correctly in that process;
a user's fresh transformers process does not get that fix, so mixing the two would hide the misload.
GPTQModel's Llava definition builds an AutoProcessor on load, and PixtralProcessor needs torchvision, which this venv
does not install: the script turns that step off (LlavaQModel.require_load_processor = False); it loads no weights.
Prints a markdown table; exits 1 if any row fails. Driven by run_gptqmodel.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402
import transformers  # noqa: E402
from gptqmodel import BACKEND, GPTQModel, __version__  # noqa: E402
from gptqmodel.models.definitions.llava import LlavaQModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

LlavaQModel.require_load_processor = False
KNOWN_MISLOADS = {("transformers", "mixtral")}


def rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(‖a − b‖ / ‖b‖, max|a − b| / max|b|)."""
    return float((a - b).norm() / b.norm()), float((a - b).abs().max() / b.abs().max())


def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    for _ in range(new):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def load(peer: str, folder: str, arch: str):
    """(the peer's torch model, its load report: missing + unexpected keys)."""
    if peer == "gptqmodel":
        return GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model, []
    cls = transformers.AutoModelForImageTextToText if arch == "pixtral" else transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(folder, device_map="cpu", dtype=torch.float16, output_loading_info=True)
    return model, sorted(info.get("missing_keys", [])) + sorted(info.get("unexpected_keys", []))


def check(peer: str, folder: str, ours: dict[str, torch.Tensor], tol: float) -> dict:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    arch = {"llava": "pixtral"}.get(cfg["model_type"], cfg["model_type"])
    q = cfg["quantization_config"]
    row = {"folder": Path(folder).name, "arch": arch, "bits": q["bits"], "act": q["desc_act"], "peer": peer}
    try:
        model, report = load(peer, folder, arch)
    except Exception as e:  # a refusal is a result: it goes in the table
        mixed = any(k.startswith("+:") and "bits" in v for k, v in q.get("dynamic", {}).items())
        known = peer == "transformers" and mixed  # it builds every module at the top-level bits (README says so)
        note = f"load: {type(e).__name__}: {str(e)[:160]}"
        return {**row, "status": "known refusal" if known else "FAIL", "note": note}
    qlinears = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}
    expected = {k[7:] for k in ours if k.startswith("weight.")}
    missing, extra = sorted(expected - set(qlinears)), sorted(set(qlinears) - expected)
    ids, new = ours["ids"], ours["greedy"].shape[1]
    with torch.inference_mode():
        torch.nn.Module.float(model)  # transformers refuses .float() on quantized models
        logits = model(input_ids=ids).logits.float()
        tokens = greedy(model, ids, new)[:, ids.shape[1] :]
        img = float("nan")
        if "image.logits" in ours:
            got = model(input_ids=ours["image.ids"], pixel_values=ours["image.pixel_values"],
                        image_sizes=ours["image.sizes"]).logits.float()  # fmt: skip
            img = rel(got, ours["image.logits"])[1]
        w_err = max((rel(qlinears[n].dequantize_weight().float().T, ours[f"weight.{n}"])[1] for n in
                     expected & set(qlinears)), default=float("nan"))  # fmt: skip
    fro, mx = rel(logits, ours["logits"])
    same = int((tokens == ours["greedy"]).sum())
    bits_wrong = sorted(n for n in expected & set(qlinears) if int(qlinears[n].bits) != int(ours[f"bits.{n}"]))
    vision_quantized = sorted(n for n in qlinears if n.split(".")[0] in ("vision_tower", "multi_modal_projector")
                              or ".vision_tower." in n or ".multi_modal_projector." in n)  # fmt: skip
    widths = sorted({int(ours[f"bits.{n}"]) for n in expected})
    row.update(bits="/".join(map(str, widths)) if len(widths) > 1 else widths[0], dynamic=len(q.get("dynamic", {})),
               linears=f"{len(expected & set(qlinears))}/{len(expected)}", bits_equal=len(bits_wrong) == 0, w=w_err,
               fro=fro, max=mx, tokens=f"{same}/{new}", report=len(report), image=img)  # fmt: skip
    ok = not missing and not extra and not report and w_err < tol and fro < tol and mx < tol and same == new
    ok = ok and not bits_wrong and not vision_quantized and ("image.logits" not in ours or img < tol)
    if ok:
        return {**row, "status": "PASS", "note": ""}
    note = f"{len(missing)} linears not quantized by the peer (e.g. {missing[:1]})" if missing else ""
    note += f"; {len(bits_wrong)} linears with other bits (e.g. {bits_wrong[:1]})" if bits_wrong else ""
    note += f"; load report: {len(report)} keys missing/unexpected (e.g. {report[:1]})" if report else ""
    note += f"; vision modules quantized by the peer (e.g. {vision_quantized[:1]})" if vision_quantized else ""
    known = (peer, arch) in KNOWN_MISLOADS and bool(report)
    return {**row, "status": "known misload" if known else "FAIL", "note": note.lstrip("; ")}


def fmt(v) -> str:
    return f"{v:.1e}" if isinstance(v, float) else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="GPTQ_DIR OURS.safetensors, repeated")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--peer", choices=("gptqmodel", "transformers"), default="gptqmodel")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("arguments come in pairs: GPTQ_DIR OURS.safetensors")
    torch.set_num_threads(2)
    workers = os.environ["GPTQMODEL_CPU_WORKERS"]
    print(f"gptqmodel {__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"GPTQMODEL_CPU_WORKERS={workers}", flush=True)  # fmt: skip
    rows = []
    for folder, ours in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        rows.append(check(args.peer, folder, load_file(ours), args.tol))
        print(" ".join(f"{k}={fmt(v)}" for k, v in rows[-1].items()), flush=True)
    cols = ["folder", "arch", "bits", "dynamic", "act", "peer", "linears", "bits_equal", "w", "fro", "max", "tokens",
            "image", "report", "status", "note"]  # fmt: skip
    print(
        "\n| folder | arch | bits | dynamic rules | act order | loader | quantized linears | per-module bits = ours "
        "| weights rel max | logits rel fro | logits rel max | greedy tokens equal | image+text logits rel max "
        "| load report | result | note |"
    )
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    fails = [r for r in rows if r["status"] == "FAIL"]
    print(f"\n{len(rows) - len(fails)} rows as expected, {len(fails)} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
