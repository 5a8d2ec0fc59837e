"""benchmarks/gpu_check.sh --dry: the GPU check's CPU-checkable parts run, and write their one results file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_mode_runs_and_writes_the_results_file(tmp_path):
    out = tmp_path / "results.txt"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # bench_kernels sets it itself on CPU
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry", str(out)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1500)
    text = out.read_text()
    assert res.returncode == 0, text[-6000:] + res.stderr[-2000:]
    assert text == res.stdout  # the file holds the whole run
    for step in ("tests", "bench_kernels", "bench_decode", "launch_count", "exl3_projection"):
        assert f"--- {step}: exit 0" in text
    assert "passed" in text and "FAIL" not in text
    assert text.count("max relative error") == 14  # 4 widths and 3 EXL3 K x 2 row counts, interpreter vs torch
    assert text.count("exl3 K=") == 6
    assert "tok/s 88L" in text and "\neager " in text and "\nstatic " in text
    assert "per decoder layer per decoded token" in text
    rows = re.findall(r"^\| [234] \| \d+ \| \d+\.\d \| \d+\.\d\d \| \d+\.\d\d \|$", text, re.M)
    assert "sm_90 SASS" in text and len(rows) == 3, rows  # exl3_encode_projection: K = 2, 3, 4
    assert "gpu_check: all steps passed" in text
