"""A metadata-only Pixtral-Large-Instruct-2411 stand-in for `convert --dry-run` and `quantize --dry-run`.

Writes FOLDER/native (params.json, tokenizer, consolidated-*.safetensors) and FOLDER/hf (config.json, index,
model-*.safetensors) whose headers describe the real model's 1159 tensors (tests/test_convert_scale.py's tables) and
whose data is a hole: each file is truncated to its full size without writing a byte, so ~250 GB per copy takes a
few MB on a filesystem that keeps sparse files (check with `du -sh FOLDER`). Delete FOLDER afterwards.
Usage: python scripts/standin_124b.py FOLDER
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import mistral_common

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_convert_scale import REAL, as_infos, native_tensor_list  # noqa: E402

from quantkit.convert.pipeline import plan_conversion  # noqa: E402


def write_sparse(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file: the real header, then a hole as long as the data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def main(folder: Path) -> None:
    params, _, _ = REAL["Pixtral-Large-Instruct-2411"]
    shapes = native_tensor_list(params)
    native, hf = folder / "native", folder / "hf"
    native.mkdir(parents=True)
    hf.mkdir()
    tok = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_241114.model.v7m1"
    shutil.copy(tok, native / "tokenizer.model.v7m1")
    (native / "params.json").write_text(json.dumps(params))
    names = list(shapes)
    for k in range(0, len(names), 40):
        write_sparse(native / f"consolidated-{k // 40:05d}.safetensors", {n: shapes[n] for n in names[k : k + 40]})
    plan = plan_conversion(params, as_infos(shapes))
    weight_map = {}
    for k, shard in enumerate(plan.shards):
        name = f"model-{k + 1:05d}-of-{len(plan.shards):05d}.safetensors"
        write_sparse(hf / name, {s.name: tuple(s.shape) for s in shard})
        weight_map |= dict.fromkeys((s.name for s in shard), name)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf / "config.json").write_text(json.dumps(plan.config, indent=1))
    shutil.copy(tok, hf / "tokenizer.model.v7m1")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
