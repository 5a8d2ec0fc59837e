"""Write the `dynamic` cases of tests/test_gptq_dynamic.py (real Pixtral-Large, Mistral-Large, Mixtral layouts at
3.0 bpw) to JSON, for tests/interop/gptqmodel_dynamic.py to check with GPTQModel's own dynamic_get.

Usage (quantkit's python): python tests/interop/dynamic_cases.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from test_gptq_dynamic import MODELS, real_build, vllm_name  # noqa: E402


def main() -> None:
    out = []
    for model in MODELS:
        b = real_build(model)
        cases = [[n, bits] for n, bits in b["modules"].items()] + [[n, False] for n in b["kept"]]
        cases += [[vllm_name(n, b["arch"]), bits] for n, bits in cases]
        out.append({"model": model, "quantization_config": b["qcfg"], "cases": cases})
        print(f"{model}: {len(b['qcfg']['dynamic'])} rules, {len(cases)} names")
    Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
