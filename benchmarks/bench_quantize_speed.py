"""Quantize speed side by side: quantkit vs GPTQModel, --bpw vs a plain run, and --dry-run's estimate vs the run.

On the real model (SmolLM2-135M-Instruct from benchmarks/real_model.py) and on the demo model (scripts/demo.sh's
tiny Pixtral-Large-like model, converted), one command after the other in this process:
- `quantkit quantize --bits 4 --format gptq` and GPTQModel (its venv, benchmarks/peer.py) on the same calibration
  ids, group size and act order: wall time, CPU time, peak RSS, and the ratios;
- `--bpw 3.0` in both formats, as a multiple of the `--bits 4` run (measurement included);
- `--dry-run`'s expected time for each quantkit command next to the measured wall time.
Each child is timed alone (wall and CPU time, and its own peak RSS through a small wrapper process), so figures
from a busy machine are slower but the ratios within one run stay comparable. Prints one markdown table.

Run: python benchmarks/bench_quantize_speed.py [--work /tmp/bench-speed] [--models real,demo] [--rows 32 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from peer import VENV, run_gptqmodel  # noqa: E402

DEMO_TOKENIZER = "mistral_instruct_tokenizer_241114.model.v7m1"
WRAP = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print('RUSAGE', time.perf_counter() - t, u.ru_utime + u.ru_stime, u.ru_maxrss * 1024, r.returncode, "
    "file=sys.stderr)"
)


def measured(argv: list[str], env: dict | None = None) -> dict:
    """Run argv in a wrapper that reports the child's wall time, CPU time and peak RSS; fail loudly."""
    proc = subprocess.run([sys.executable, "-c", WRAP, *argv], cwd=REPO, capture_output=True, text=True, env=env)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("RUSAGE"))
    wall, cpu, rss, rc = line.split()[1:]
    if int(rc):
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": float(wall), "cpu_s": float(cpu), "rss_gb": int(rss) / 1e9, "log": proc.stdout + proc.stderr}


def dry_run_seconds(model: Path, args: list[str]) -> float:
    """The expected time `quantize --dry-run` prints ("expected time: about N s/min/h/days"), in seconds."""
    out = subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(model), "/tmp/unused-dry-run", *args,
                          "--dry-run"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    m = re.search(r"expected time: about ([\d.,]+) (s|min|h|days)\b", out.stdout + out.stderr)
    if m is None:
        raise SystemExit(f"no time estimate in --dry-run output:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1).replace(",", "")) * {"s": 1, "min": 60, "h": 3600, "days": 86400}[m.group(2)]


def calibration_ids(model: Path, calib: list[str], rows: int, seq_len: int) -> torch.Tensor:
    """The rows quantkit calibrates on, so GPTQModel gets exactly the same ids."""
    from quantkit.calib.rows import tokenized_rows
    from quantkit.calib.sources import load_calibration
    from quantkit.tokenizer.chat import ChatTokenizer

    dataset = calib[calib.index("--dataset") + 1] if "--dataset" in calib else None
    return tokenized_rows(ChatTokenizer.from_folder(model), load_calibration(dataset), rows, seq_len, 0).ids


def bench_model(name: str, model: Path, work: Path, group: int, calib: list[str], rows: int, seq_len: int) -> list:
    common = ["--group-size", str(group), "--rows", str(rows), "--seq-len", str(seq_len), *calib, "--quiet"]
    runs = {
        "quantkit --bits 4 --format gptq": ["--bits", "4", "--format", "gptq"],
        "quantkit --bpw 3.0 --format gptq": ["--bpw", "3.0", "--format", "gptq"],
        "quantkit --bpw 3.0 (quantkit format)": ["--bpw", "3.0", "--format", "quantkit"],
    }
    out = []
    for label, args in runs.items():
        dst = work / f"{name}-{len(out)}"
        expected = dry_run_seconds(model, [*args, *common])
        r = measured([sys.executable, "-m", "quantkit", "quantize", str(model), str(dst), *args, *common,
                      "--force", "--restart"])  # fmt: skip
        out.append({"model": name, "run": label, **r, "dry_run_s": expected})
        print(f"{name}: {label}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['rss_gb']:.2f} GB peak RSS, "
              f"--dry-run said {expected:.0f} s", flush=True)  # fmt: skip
    if (VENV / "bin" / "python").is_file():
        ids = calibration_ids(model, calib, rows, seq_len)
        t0 = time.perf_counter()
        info = run_gptqmodel(model, ids, work / f"{name}-gptqmodel", 4, group, True, True, 0.01)
        wall = time.perf_counter() - t0
        out.append({"model": name, "run": f"GPTQModel {info['gptqmodel']} 4-bit", "wall_s": wall,
                    "cpu_s": float("nan"), "rss_gb": info.get("peak_rss_gb", float("nan")),
                    "dry_run_s": float("nan"), "quantize_s": info["seconds"]})  # fmt: skip
        print(f"{name}: GPTQModel: {wall:.1f} s wall (quantize() alone {info['seconds']:.1f} s), "
              f"{info['peak_rss_gb']:.2f} GB peak RSS", flush=True)  # fmt: skip
    return out


def synthetic_hf(work: Path, preset: str, name: str, keep_native: bool) -> Path:
    """work/NAME-hf: the quantkit.synthetic preset with the demo's tokenizer, converted (built once)."""
    hf = work / f"{name}-hf"
    if not (hf / "config.json").is_file():
        tok = Path(__import__("mistral_common").__file__).parent / "data" / DEMO_TOKENIZER
        native = work / f"{name}-native"
        synthetic = [sys.executable, "-m", "quantkit.synthetic", preset, str(native)]
        subprocess.run([*synthetic, "--tokenizer", str(tok)], check=True)
        subprocess.run([sys.executable, "-m", "quantkit", "convert", str(native), str(hf), "--quiet"], check=True)
        if not keep_native:
            shutil.rmtree(native)
    return hf


def table(rows: list[dict]) -> str:
    lines = ["| model | run | wall s | CPU s | peak RSS GB | vs quantkit --bits 4 | --dry-run s (ratio run/estimate) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["run"].startswith("quantkit --bits 4"))
        est = f"{r['dry_run_s']:.0f} ({r['wall_s'] / r['dry_run_s']:.2f})" if r["dry_run_s"] == r["dry_run_s"] else "-"
        lines.append(f"| {r['model']} | {r['run']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_gb']:.2f} | "
                     f"{r['wall_s'] / base['wall_s']:.2f}x | {est} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-speed"))
    ap.add_argument("--models", default="real,demo", help="comma-separated: real, demo, pixtral-large-layer (a GPU's)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "real" in args.models:
        import real_model

        hf = args.work / "smollm2" / "smollm2-hf"
        if not (hf / "config.json").is_file():
            real_model.build(args.work / "smollm2")
        calib = ["--dataset", str(REPO / "calib_data" / "prose_en.txt")]
        rows += bench_model("SmolLM2-135M", hf, args.work, 64, calib, args.rows, args.seq_len)
    if "demo" in args.models:
        demo = synthetic_hf(args.work, "tiny-pixtral-large", "demo", keep_native=True)
        rows += bench_model("demo", demo, args.work, 64, [], 8, 256)
    if "pixtral-large-layer" in args.models:  # benchmarks/gpu_check.sh: one layer at the flagship's widths
        big = synthetic_hf(args.work, "pixtral-large-layer", "pl-layer", keep_native=False)
        rows += bench_model("Pixtral-Large layer", big, args.work, 128, [], args.rows, args.seq_len)
    print(table(rows))
    (args.work / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "log"} for r in rows]))


if __name__ == "__main__":
    main()
