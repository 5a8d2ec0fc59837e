"""Quality per byte on the benchmark model: 16-bit vs RTN vs GPTQ vs mixed --bpw (with and without --rotate) vs
GPTQModel, on held-out text. Prints a markdown table and writes benchmarks/RESULTS.md.

The benchmark model is the small Mistral-architecture LM that benchmarks/train_bench_model.py trains on the
Python standard library (real language statistics, built offline); held-out perplexity is measured on its
held-out files. Every quantizer sees the same calibration rows (the bundled mix, tokenized by quantkit).
Columns: realized bits per decoder weight (every stored byte counted), folder size, held-out perplexity, mean KL
divergence and top-1 agreement against the 16-bit model, quantization wall time on this machine.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch
from click.testing import CliRunner

from quantkit.cli import main as cli
from quantkit.convert.pipeline import convert
from quantkit.eval import evaluate
from quantkit.eval_command import EvalSettings, eval_rows, logits_fn
from quantkit.inspect import describe
from quantkit.io.reader import folder_size
from quantkit.model.load import Checkpoint
from quantkit.quant.gptq import rtn_quantize
from quantkit.quant.pipeline import _calibration
from quantkit.runtime import load_any

sys.path.insert(0, str(Path(__file__).parent))
from peer import run_gptqmodel  # noqa: E402

CACHE = Path.home() / ".cache" / "quantkit-bench"
GROUP = 128


def quantkit_cli(*args) -> float:
    """Run `quantkit quantize ...` in-process; returns wall seconds."""
    t = time.perf_counter()
    result = CliRunner().invoke(cli, ["quantize", *map(str, args), "--quiet", "--force", "--restart"])
    if result.exit_code:
        raise SystemExit(f"quantize {args} failed: {result.output}{result.exception}")
    return time.perf_counter() - t


def gptq_layout_bits(out_f: int, in_f: int, bits: int, group: int) -> int:
    """Stored bits of one linear in the GPTQ layout: codes, fp16 scales, packed zeros, int32 g_idx."""
    groups = in_f // group
    return out_f * in_f * bits + groups * out_f * (16 + bits) + 32 * in_f


def rtn_model(hf: Path, bits: int):
    """The float model with every decoder linear replaced by its round-to-nearest quantization (fake quant)."""
    model = load_any(hf, "cpu", "float32", "torch", progress=False)
    stored = numel = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("layers."):
            mod.weight.data = rtn_quantize(mod.weight.data, bits, GROUP).weight
            stored += gptq_layout_bits(*mod.weight.shape, bits, GROUP)
            numel += mod.weight.numel()
    return model, stored / numel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=CACHE / "bench-model", help="train_bench_model.py's output")
    ap.add_argument("--work", type=Path, help="work folder (default: ~/.cache/quantkit-bench/quality-<model name>)")
    ap.add_argument("--calib-rows", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--no-peer", action="store_true", help="skip GPTQModel")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = ap.parse_args()

    args.work = args.work or CACHE / f"quality-{args.model.name}"  # one per model: its converted copy lives there
    native, heldout = args.model / "native", args.model / "heldout.jsonl"
    if not (native / "params.json").is_file():
        raise SystemExit(f"no benchmark model at {native}: run benchmarks/train_bench_model.py first")
    args.work.mkdir(parents=True, exist_ok=True)
    hf = args.work / "hf"
    if not (hf / "config.json").is_file():
        convert(native, hf, progress=False)
    es = EvalSettings(str(heldout), rows=args.eval_rows, seq_len=args.eval_seq_len, device="cpu", dtype="float32",
                      backend="torch")  # fmt: skip
    rows = eval_rows(hf, es).ids
    float_model = load_any(hf, "cpu", "float32", "torch", progress=False)
    reference = logits_fn(float_model)
    q = ["--rows", args.calib_rows, "--seq-len", args.calib_seq_len, "--group-size", GROUP]
    results = []

    def record(label: str, model_or_dir, bpw: float | None, size: int | None, seconds: float | None) -> None:
        model = model_or_dir
        if isinstance(model_or_dir, Path):
            model = load_any(model_or_dir, "cpu", "float32", "torch", progress=False)
        r = evaluate(logits_fn(model), rows, None if label == "16-bit" else reference, progress=False)
        results.append((label, bpw, size, r, seconds))
        write_results(args, results)
        kl = "" if r.kl_divergence is None else f" KL {r.kl_divergence:.4f} top-1 {r.top1_agreement:.3f}"
        print(f"{label}: bpw {bpw} ppl {r.perplexity:.3f}{kl}", flush=True)

    def realized(folder: Path) -> float:
        return describe(folder)["quantized"]["decoder_bpw"]

    record("16-bit", float_model, 16.0, folder_size(hf), None)
    for bits in (2, 3, 4):
        t = time.perf_counter()
        model, bpw = rtn_model(hf, bits)
        record(f"RTN {bits}-bit g{GROUP}", model, bpw, None, time.perf_counter() - t)
    uniform: dict[bool, dict[int, float]] = {}  # rotate -> bits -> realized bpw of the uniform builds
    for rotate in (False, True):
        tag, extra = (" --rotate", ["--rotate"]) if rotate else ("", [])
        uniform[rotate] = {}
        for bits in (2, 3, 4):
            out = args.work / f"gptq{bits}{'-rot' if rotate else ''}"
            seconds = quantkit_cli(hf, out, "--bits", bits, *extra, *q)
            uniform[rotate][bits] = realized(out)
            label = f"quantkit GPTQ {bits}-bit g{GROUP} act-order{tag}"
            record(label, out, uniform[rotate][bits], folder_size(out), seconds)
        if not rotate and not args.no_peer:
            ids = _calibration(Checkpoint(hf), None, "train", "text", args.calib_rows, args.calib_seq_len, 0).ids
            for bits in (3, 4):
                out = args.work / f"gptqmodel{bits}"
                shutil.rmtree(out, ignore_errors=True)
                info = run_gptqmodel(hf, ids, out, bits, GROUP, True, True, 0.01)
                if info is not None:
                    label = f"GPTQModel {bits}-bit g{GROUP} desc_act"
                    record(label, out, realized(out), folder_size(out), info["seconds"])
    # Mixed at the round targets and at each uniform build's exact size (equal bytes on disk). Rotation signs cost
    # 8 bits per input feature, so rotated builds are compared with the rotated uniform builds.
    for rotate in (False, True):
        tag, extra, suffix = (" --rotate", ["--rotate"], "-rot") if rotate else ("", [], "")
        measurement = args.work / f"measurement{suffix}.json"
        measurement.unlink(missing_ok=True)  # measured afresh in every run (and timed in its first row)
        same_size = {b + 1e-9: bits for bits, b in uniform[rotate].items()}  # exact bpw, float slack
        for target in sorted({2.5, 3.0, 3.5, 4.0, *same_size}):
            out = args.work / f"mixed{target:.3f}{suffix}"
            reuse = ["--measurement", measurement] if measurement.is_file() else []
            seconds = quantkit_cli(hf, out, "--bpw", target, *extra, *reuse, *q)
            if not reuse:
                shutil.copy(args.work / f".{out.name}.quantkit-work" / "measurement.json", measurement)
            note = f" (size of GPTQ {same_size[target]}-bit{tag})" if target in same_size else ""
            note += "" if reuse else " (incl. measurement)"
            record(f"quantkit mixed --bpw {target:.3f}{tag}{note}", out, realized(out), folder_size(out), seconds)

    write_results(args, results)
    print((args.out).read_text())


def write_results(args, results) -> None:
    """Write RESULTS.md with the rows measured so far (called after every row, so a cut run leaves its figures)."""
    lines = [
        "| model | bits per decoder weight | size (MB) | held-out ppl | KL vs 16-bit | top-1 agreement "
        "| quant. time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, bpw, size, r, seconds in results:
        kl = "" if r.kl_divergence is None else f"{r.kl_divergence:.6f}"
        top1 = "" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        lines.append(
            f"| {label} | {bpw:.3f} | {'' if size is None else f'{size / 1e6:.2f}'} | {r.perplexity:.3f} | {kl} | "
            f"{top1} | {'' if seconds is None else f'{seconds:.0f}'} |"
        )
    table = "\n".join(lines)
    command = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
    args.out.write_text(
        f"# Quality per byte on the benchmark model\n\nProduced by `{command.strip()}` on {date.today()} "
        f"({platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}).\n\n"
        f"Model: {args.model} (see benchmarks/train_bench_model.py). Calibration: the bundled mix, "
        f"{args.calib_rows} rows x {args.calib_seq_len} tokens, the same rows for every quantizer. Held-out: "
        f"{args.eval_rows} rows x {args.eval_seq_len} tokens of held-out files. RTN rows are fake-quantized with "
        f"the GPTQ layout's size; RTN's time is the rounding alone.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
