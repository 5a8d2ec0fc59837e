"""EXL3 against GPTQ-style builds on the real model, the first N decoder layers quantized (issue 27, must-show 3).

CPU trellis encoding is too slow for all 30 layers of SmolLM2-135M here, so every method quantizes the same first N
layers. real_model.py --layers N writes that truncated model (its first N layers, final norm and head; a layer's
inputs depend only on the layers before it, so its calibration inputs are the full model's); quantkit quantizes it
with bench_real.py's calibration (prose, 32 x 512, group 64 for GPTQ); the quantized linears, dequantized (each
applied to an identity matrix, so whatever the format stores is what is measured), replace the full model's first N
layers, the other layers stay 16-bit; every build is evaluated on bench_real.py's held-out rows against the 16-bit
model. Bits per weight are those of the N quantized layers, every stored byte counted (EXL3: padded to multiples of
128 as it stores them, so SmolLM2's 576 / 1536 widths cost it 11-33% more than the same K on a 128-multiple model).

    python benchmarks/bench_exl3_quality.py [--layers 1] [--targets 2.5,3.0,4.0] [--exl3-targets T,...]
        [--exl3-bits 2,3,4] [--work /tmp/bench-exl3q]

Builds are cached in the work folder (bench_real.py's cache: same command, same folder); a --bpw build reuses a saved
measurement of its format that serves its target (--measurement, WORK/measurement-FMT*.json), else it measures for
the format's highest target (--measure-for) and saves that measurement for the others, as bench_real.py does.
The table is printed and written to WORK/table.md. Expect minutes per layer for GPTQ and, on 2 cores, about half an
hour per layer for an EXL3 measurement (SmolLM2's first layer at K = 2..5: 30 min) and 10-20 min per EXL3 build.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from quantkit.evaluation import EvalSettings, eval_rows, logits_fn
from quantkit.formats.registry import get_format
from quantkit.inspect import describe
from quantkit.metrics import evaluate_many
from quantkit.quant.measure import covers, floor_for
from quantkit.quantized_model import load_any

sys.path.insert(0, str(Path(__file__).parent))
from bench_real import CALIB, GROUP, HELDOUT, quantkit_build, write_heldout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def truncated(work: Path, layers: int) -> Path:
    """The first `layers` decoder layers of SmolLM2-135M-Instruct (real_model.py --layers), built once."""
    out = work / f"smollm2-{layers}l"
    if not (out / "smollm2-hf" / "config.json").is_file():
        subprocess.run([sys.executable, "benchmarks/real_model.py", str(out), "--layers", str(layers)], cwd=REPO,
                       check=True)  # fmt: skip
    return out / "smollm2-hf"


def serving(work: Path, fmt: str, target: float) -> Path | None:
    """The saved measurement of this format (work/measurement-FMT*.json) that serves --bpw target and measured the
    fewest candidates (the lowest reach), if any."""
    saved = {p: json.loads(p.read_text()) for p in work.glob(f"measurement-{fmt}*.json")}
    window = get_format(fmt).reach_for(target), floor_for(fmt, target)
    fits = [p for p, m in saved.items() if covers(m.get("reach"), window[0], m.get("floor"), window[1])]
    return min(fits, key=lambda p: (saved[p].get("reach") is None, saved[p].get("reach") or 0.0), default=None)


@torch.no_grad()
def spliced(full: Path, build: Path) -> nn.Module:
    """The 16-bit full model with each linear of the build (a truncated model) replaced by its dequantized weight."""
    model = load_any(full, "cpu", "float32", "torch", progress=False)
    quant = load_any(build, "cpu", "float32", "torch", progress=False, keep_dense=False, fuse=False)
    replaced = 0
    for name, q in quant.named_modules():
        if not name.startswith("layers.") or isinstance(q, nn.Linear) or not hasattr(q, "in_features"):
            continue
        target = model.get_submodule(name)
        dense = q(torch.eye(q.in_features)).T  # [out, in]: column j is the linear's response to input j
        target.weight.copy_(dense.to(target.weight.dtype))
        replaced += 1
    if replaced == 0:
        raise SystemExit(f"{build}: no quantized linears found")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/realmodel/smollm2-hf"), help="the full model "
                    "(real_model.py OUT/smollm2-hf)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=1, help="quantize the first N decoder layers")
    ap.add_argument("--targets", default="2.5,3.0,4.0", help="--bpw targets, comma-separated")
    ap.add_argument("--exl3-targets", default=None, help="--bpw targets of the EXL3 builds (default: --targets)")
    ap.add_argument("--exl3-bits", default="2,3,4", help="uniform EXL3 --bits K builds, comma-separated ('' none)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-exl3q"))
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    full = args.model.resolve()
    if not (full / "config.json").is_file():
        raise SystemExit(f"no model at {full}: run python benchmarks/real_model.py OUT first")
    src = truncated(work, args.layers)
    calib = ["--dataset", CALIB, "--rows", 32, "--seq-len", 512]
    grid = ["--group-size", GROUP]  # GPTQ's alone: EXL3 has no groups (and refuses the option)
    targets = [float(t) for t in args.targets.split(",") if t]
    plan: list[tuple[str, str, list]] = [
        *((f"gptq{b}", f"GPTQ {b}-bit g{GROUP} (uniform)", ["--bits", b, "--format", "gptq", *grid]) for b in (3, 4)),
        *((f"exl3-k{k}", f"EXL3 K={k} (uniform)", ["--bits", k, "--format", "exl3"])
          for k in (int(k) for k in args.exl3_bits.split(",") if k)),  # fmt: skip
    ]
    exl3_targets = targets if args.exl3_targets is None else [float(t) for t in args.exl3_targets.split(",") if t]
    builds = [quantkit_build(work, name, label, src, [*qargs, *calib], False) for name, label, qargs in plan]
    for fmt, fmt_targets in (("gptq", targets), ("quantkit", targets), ("exl3", exl3_targets)):
        for t in fmt_targets:
            name, measurement = f"bpw{t:g}-{fmt}", serving(work, fmt, t)
            first = measurement is None  # this build measures for the highest target; later ones reuse it
            reuse = ["--measure-for", max(fmt_targets)] if first else ["--measurement", measurement]
            label = f"--bpw {t:g} --format {fmt}" + (" (incl. measurement)" if first else "")
            qargs = ["--bpw", t, "--format", fmt, *calib, *reuse, *(grid if fmt != "exl3" else [])]
            builds.append(quantkit_build(work, name, label, src, qargs, False))
            if first:
                saved = work / f"measurement-{fmt}-for{max(fmt_targets):g}.json"
                shutil.copy(work / f".{name}.quantkit-work" / "measurement.json", saved)

    heldout = work / HELDOUT
    write_heldout(heldout)
    es = EvalSettings(str(heldout), rows=args.eval_rows, seq_len=args.eval_seq_len, device="cpu", dtype="float32",
                      backend="torch")  # fmt: skip
    rows = eval_rows(full, es)
    t = time.perf_counter()
    models = {"16-bit": logits_fn(load_any(full, "cpu", "float32", "torch", progress=False))}
    models |= {b.label: logits_fn(spliced(full, Path(b.folder))) for b in builds}
    results = evaluate_many(models, rows.ids, models["16-bit"])
    lines = [
        f"First {args.layers} of 30 decoder layers quantized ({src}), the rest 16-bit; held-out {rows.ids.shape[0]} "
        f"x {rows.ids.shape[1]} tokens; 16-bit perplexity {results['16-bit'].perplexity:.3f}; evaluation "
        f"{time.perf_counter() - t:.0f} s.",
        "",
        "| build | bits per weight (quantized layers) | held-out ppl | KL vs 16-bit | top-1 agreement | wall (s) |",
        "|---|---|---|---|---|---|",
    ]
    for b in builds:
        r = results[b.label]
        bpw = describe(Path(b.folder))["quantized"]["decoder_bpw"]
        lines.append(f"| {b.label} | {bpw:.3f} | {r.perplexity:.3f} | {r.kl_divergence:.5f} | "
                     f"{r.top1_agreement:.4f} | {b.wall_s:.0f} |")  # fmt: skip
    table = "\n".join(lines)
    (work / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
