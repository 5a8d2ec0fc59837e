"""Every kernel launch the runtime would make compiles for sm_80 and sm_90 with Triton's real compiler (no GPU).

quantkit.kernels.compile_check runs in a subprocess because this test session has Triton in interpreter mode
(TRITON_INTERPRET=1 is read when Triton is imported). Its table of registers, spills and shared memory is printed
(pytest -s, or shown with a failure).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def compile_check(*args: str, json_out: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "quantkit.kernels.compile_check", *args]
    if json_out:
        cmd += ["--json", str(json_out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_every_runtime_launch_compiles_without_spills_within_shared_memory(tmp_path):
    out = tmp_path / "rows.json"
    res = compile_check("--sweeps", "ci", json_out=out)
    print(res.stdout)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["arch"], r["example"]["bits"], r["example"]["dtype"], p) for r in rows for p in r["paths"]}
    for arch in (80, 90):  # coverage: the check cannot pass by compiling less than the runtime launches
        for bits in range(2, 9):
            for path in ("skinny", "tiled"):
                assert (arch, bits, "torch.float16", path) in seen, (arch, bits, path)
        assert {r["example"]["dtype"] for r in rows if r["arch"] == arch} >= {"torch.bfloat16", "torch.float32"}
    exl3 = {(r["arch"], r["example"]["bits"], r["example"]["book"], r["example"]["dtype"], p)
            for r in rows if "exl3" in r["sweeps"] for p in r["paths"]}  # fmt: skip
    for a, k, b in itertools.product((80, 90), range(1, 9), ("3inst", "mcg", "mul1")):  # EXL3 decode and GEMV
        for dtype in ("torch.float16", "torch.bfloat16"):
            assert {(a, k, b, dtype, "decode"), (a, k, b, dtype, "gemv")} <= exl3, (a, k, b, dtype)
        assert (a, k, b, "torch.float32", "decode") in exl3
    books = ("3inst", "mcg", "mul1")
    viterbi = {(r["arch"], r["example"]["bits"], r["example"]["book"], bool(r["example"]["m"]))
               for r in rows if "viterbi" in r["paths"]}  # fmt: skip
    assert viterbi == set(itertools.product((80, 90), range(1, 9), books, (False, True)))
    back = {(r["arch"], r["example"]["bits"]) for r in rows if "viterbi_back" in r["paths"]}  # decodes no values
    assert back == set(itertools.product((80, 90), range(1, 9)))
    sweeps = {s for r in rows for s in r["sweeps"]}
    assert {f"variants:{v}" for v in ("g32", "per_channel", "zeros", "mixed", "bias")} <= sweeps
    for r in rows:
        res_ = r["result"]
        assert res_["ok"] and res_["spill"] == 0 and res_["shared"] <= {80: 163, 90: 227}[r["arch"]] * 1024


@pytest.mark.slow
def test_the_check_fails_on_a_launch_that_overflows_shared_memory():
    # index unpack stages one int32 word per weight of a 128x256 tile (128 KiB) per pipeline stage: 4 stages are far
    # beyond sm_80's 163 KiB, so this launch must be flagged
    launch = '{"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 128, "unpack": "index", "num_stages": 4, "split_k": 1}'
    res = compile_check("--sweeps", "configs", "--arch", "80", "--bits", "4", "--launch", launch)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SMEM>163KiB" in res.stdout


@pytest.mark.slow
def test_autotune_keeps_only_candidates_that_fit_at_every_bit_width():
    # index unpack stages each plane: 4 bits (one plane) fits sm_80's shared memory, 7 bits (three planes) does not
    code = """
from quantkit.kernels.compile_check import usable
big = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, split_k=1, unpack="index", num_warps=4, num_stages=4)
small = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, split_k=1, unpack="reshape", num_warps=4, num_stages=3)
print(usable("tiled", 512, [big, small], 80, bits=(4,)) == [big, small])
print(usable("tiled", 512, [big, small], 80, bits=(4, 7)) == [small])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.stdout.split() == ["True", "True"], res.stdout + res.stderr[-3000:]
