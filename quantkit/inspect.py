"""`quantkit inspect`: what a model folder holds, read from headers and configs only (no tensor data)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantkit.arch import detect_arch
from quantkit.io.checkpoint import folder_format, hf_weight_files, native_weight_files, read_json
from quantkit.io.reader import TensorIndex, folder_size

# Which part of the model a tensor belongs to, by name prefix (native and HF names).
PART_PREFIXES = (
    ("vision", ("vision_encoder.", "vision_tower.", "model.vision_tower.")),
    ("projector", ("vision_language_adapter.", "multi_modal_projector.", "model.multi_modal_projector.")),
)


def tensor_part(name: str) -> str:
    for part, prefixes in PART_PREFIXES:
        if name.startswith(prefixes):
            return part
    return "text"


def describe(path: Path) -> dict:
    """A JSON-ready report: format, architecture, parameters per part, dtypes, layers, size on disk."""
    path = Path(path)
    fmt = folder_format(path)
    if fmt == "native":
        params = read_json(path / "params.json")
        arch = detect_arch(params)
        architecture, layers = f"{arch.name} ({arch.hf_class})", int(params.get("n_layers", 0))
        index = TensorIndex(native_weight_files(path))
    else:
        config = read_json(path / "config.json")
        architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
        layers = int(config.get("text_config", config).get("num_hidden_layers", 0))
        index = TensorIndex(hf_weight_files(path))
    parts: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for name, info in index.infos.items():
        parts[tensor_part(name)] += info.numel
        dtypes[info.dtype] += info.numel
    report = {
        "path": str(path),
        "format": fmt,
        "architecture": architecture,
        "layers": layers,
        "tensors": len(index),
        "parameters": {"text": parts["text"], "vision": parts["vision"], "projector": parts["projector"]},
        "total_parameters": sum(parts.values()),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),
        "size_bytes": folder_size(path),
    }
    if fmt == "quantized":
        report["quantization_config"] = read_json(path / "config.json")["quantization_config"]
    return report


def format_report(r: dict) -> str:
    p = r["parameters"]
    lines = [
        f"{r['path']}: {r['format']} checkpoint, {r['architecture']}, {r['layers']} layers",
        f"parameters: {r['total_parameters']:,} (text {p['text']:,}, vision {p['vision']:,}, "
        f"projector {p['projector']:,}) in {r['tensors']} tensors",
        f"dtype: {r['dtype']}; size on disk: {r['size_bytes'] / 1e9:.3f} GB",
    ]
    return "\n".join(lines)
