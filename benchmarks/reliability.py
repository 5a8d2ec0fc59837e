"""Issue 17's figures: hostile inputs tried / handled, kill -9 runs / byte-identical reruns, stale bytes left,
concurrent runs refused. Runs the reliability suite (tests/test_reliability.py, tests/test_safety.py) with more
kills than CI does.

Run: python benchmarks/reliability.py [--kills 10] [--seed 17]
(about 30 s per kill and quantize job on a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="kill -9 runs per job (convert, quantize bits 4, bpw 3.0)")
    ap.add_argument("--seed", type=int, default=17, help="seed of the kill moments")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QUANTKIT_KILLS": str(args.kills)}
    env["QUANTKIT_KILL_SEED"] = str(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "results.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "reliability",
               f"--junitxml={xml}", "tests/test_reliability.py", "tests/test_safety.py"]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).stdout
        results = {c.get("name"): c.find("failure") is None and c.find("error") is None
                   for c in ET.parse(xml).getroot().iter("testcase")}  # fmt: skip
    bad = {k: ok for k, ok in results.items() if k.startswith("test_bad_input[")}
    print(f"bad inputs: {len(bad)} tried, {sum(bad.values())} handled (exit 1, one line, source unchanged, no DST)")
    for name, ok in bad.items():
        if not ok:
            print(f"  not handled: {name}")
    figures = [(m.group(1), ast.literal_eval(m.group(2))) for m in re.finditer(r"(\w+): (\{.*\})$", out, re.M)]
    for job, f in figures:
        print(f"  {job}: {f['kills']} kills, {f['identical']} byte-identical reruns, killed in: {f.get('phases')}")
    total = {k: sum(f.get(k, 0) for _, f in figures) for k in ("kills", "identical", "half_written", "stale_bytes")}
    print(f"kill -9: {total['kills']} kills, {total['identical']} byte-identical reruns, "
          f"{total['half_written']} half-written DST, {total['stale_bytes']} stale bytes left")  # fmt: skip
    concurrent = results.get("test_concurrent_quantize_one_refused_other_byte_identical")
    verdict = "one refused, the other byte-identical to a solo build" if concurrent else "FAILED"
    print(f"concurrent quantize, second run 3 s after the first: {verdict}")
    print(f"pytest: {out.strip().splitlines()[-1] if out.strip() else 'no output'}")


if __name__ == "__main__":
    main()
