"""GPTQModel's own dynamic_get on quantkit's `dynamic` rules (runs in the interop venv).

Usage: python tests/interop/gptqmodel_dynamic.py CASES.json   (CASES.json from tests/interop/dynamic_cases.py)
For every model and name, gptqmodel.quantization.config.dynamic_get(dynamic, name, "bits", bits) must give the bits
quantkit allocated (False: the module stays 16-bit). Exits 1 on any difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptqmodel import __version__
from gptqmodel.quantization.config import dynamic_get


def main() -> int:
    bad = 0
    print(f"gptqmodel {__version__}")
    for entry in json.loads(Path(sys.argv[1]).read_text()):
        q = entry["quantization_config"]
        wrong = [(n, want, got) for n, want in entry["cases"]
                 if (got := dynamic_get(q["dynamic"], n, "bits", q["bits"])) != want]  # fmt: skip
        bad += len(wrong)
        print(f"{entry['model']}: {len(entry['cases']) - len(wrong)}/{len(entry['cases'])} names agree "
              f"({len(q['dynamic'])} rules){'; e.g. ' + str(wrong[:3]) if wrong else ''}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
