"""What is in a folder: a Mistral-native checkpoint, a Hugging Face one, or a quantized one, and its weight files.

Both layouts may be one file or shards plus an index; the index, when present, must agree with the shards
(every listed file exists), so a half-downloaded model is reported before any work starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import QuantkitError

NATIVE_INDEX = "consolidated.safetensors.index.json"
HF_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    """Load a JSON object with a one-line error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path.name} is not valid JSON ({e})") from None
    except RecursionError:
        raise QuantkitError(f"{path.name} is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{path.name} must hold a JSON object")
    return data


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _check_shard_name(folder: Path, index_name: str, name) -> None:
    """A shard named by an index must be a safetensors file inside the folder: `../x`, absolute paths and files
    under a symlinked folder that leads out are refused, so is pickle. A shard that is itself a symlink (the
    Hugging Face cache's snapshots/ -> blobs/ layout) is fine: its name is inside the folder."""
    if not isinstance(name, str) or not name:
        raise QuantkitError(f"{index_name} names a shard that is not a file name: {name!r}")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise QuantkitError(f"{index_name} names {name}: pickle files are not loaded (they run code); use safetensors")
    if not name.endswith(".safetensors"):
        raise QuantkitError(f"{index_name} names {name}, which is not a .safetensors file")
    base = Path(folder).resolve()
    entry = Path(folder, name)
    if Path(name).is_absolute() or not (entry.parent.resolve() == base or base in entry.parent.resolve().parents):
        raise QuantkitError(f"{index_name} names {name}, which is outside the checkpoint folder {folder}")


def _indexed_files(folder: Path, index_name: str) -> list[Path] | None:
    index = folder / index_name
    if not index.is_file():
        return None
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise QuantkitError(f"{index_name} has no weight_map")
    names = sorted(set(weight_map.values()))
    for n in names:
        _check_shard_name(folder, index_name, n)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise QuantkitError(f"{index_name} lists files that are missing: {', '.join(missing)}")
    return [folder / n for n in names]


def native_weight_files(folder: Path) -> list[Path]:
    """consolidated.safetensors, or consolidated-0000i-of-0000N.safetensors (checked against the index if any)."""
    folder = Path(folder)
    files = _indexed_files(folder, NATIVE_INDEX)
    if files is None:
        files = sorted(p for p in folder.glob("consolidated*.safetensors") if p.is_file())
    if not files:
        found = sorted(p.name for p in folder.glob("*.pt*")) + sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(found[:3])}: pickle files are not loaded, use safetensors)" if found else ""
        raise QuantkitError(f"no consolidated*.safetensors in {folder}{hint}")
    return files


def hf_weight_files(folder: Path) -> list[Path]:
    """model.safetensors or model-0000i-of-0000N.safetensors (checked against model.safetensors.index.json)."""
    folder = Path(folder)
    files = _indexed_files(folder, HF_INDEX)
    if files is None:
        files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise QuantkitError(f"no *.safetensors weights in {folder}")
    return files


def folder_format(folder: Path) -> str:
    """'native', 'hf' or 'quantized'; a one-line error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is not a folder")
    if (folder / "config.json").is_file():
        return "quantized" if "quantization_config" in read_json(folder / "config.json") else "hf"
    if (folder / "params.json").is_file():
        return "native"
    raise QuantkitError(f"{folder} has neither config.json (Hugging Face layout) nor params.json (Mistral-native)")
