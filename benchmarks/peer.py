"""The peer quantizer for bench_quality.py: GPTQModel, run in its own venv by benchmarks/peer_gptqmodel.py (issue 8).

The venv is the one tests/interop/run_gptqmodel.sh makes; nothing here imports gptqmodel.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().with_name("peer_gptqmodel.py")
VENV = Path.home() / ".cache/quantkit-interop/venv"


def run_gptqmodel(
    src: Path,
    ids: torch.Tensor,
    out: Path,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = True,
    sym: bool = True,
    damp: float = 0.01,
    venv: Path = VENV,
    mse: float = 0.0,
) -> dict | None:
    """Quantize src with GPTQModel on CPU on exactly these calibration rows (int64 [rows, seq_len]) into out (GPTQ
    format). Returns the script's JSON ({"seconds", "bits", "group_size", "desc_act", ...}), None without the venv."""
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        print(f"GPTQModel skipped: no venv at {venv} (run tests/interop/run_gptqmodel.sh first)")
        return None
    with tempfile.TemporaryDirectory(prefix="peer-calib-") as tmp:
        calib = Path(tmp) / "calib.safetensors"
        save_file({"ids": ids.to(torch.int64).contiguous()}, str(calib))
        cmd = [str(python), str(SCRIPT), str(Path(src).resolve()), str(calib), str(Path(out).resolve())]
        cmd += ["--bits", str(bits)]
        cmd += ["--group-size", str(group_size), "--desc-act" if desc_act else "--no-desc-act"]
        cmd += ["--sym" if sym else "--asym", "--damp", str(damp), "--mse", str(mse)]
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
        # cwd: GPTQModel writes logs/gptq_log_*.log into the working directory.
        proc = subprocess.run(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        print(proc.stdout[-4000:])
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])
