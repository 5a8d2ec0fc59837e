"""`quantkit inspect`: what a model folder holds, read from headers and configs only (no tensor data)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from quantkit.arch import detect_arch
from quantkit.arch.blocks import tensor_part
from quantkit.io.checkpoint import folder_format, hf_weight_files, native_weight_files, read_json
from quantkit.io.reader import TensorIndex, folder_size


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
    if fmt == "quantized":  # refuse what run and eval would refuse: a bad config, packed tensors of wrong shapes
        from quantkit.quantized_model import check_packed, quantization_config

        qcfg = quantization_config(path)
        check_packed(qcfg, index)
    quantized = quantized_summary(index, qcfg) if fmt == "quantized" else None
    packed = quantized["linears"] if quantized else {}
    for name, info in index.infos.items():
        prefix = name.rpartition(".")[0]
        if prefix in packed:  # a packed linear counts its weights once, as parameters, not its int32 words
            if name == f"{prefix}.{quantized['key_tensor']}":
                parts[tensor_part(name)] += packed[prefix]["numel"]
            continue
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
    if quantized:
        report["quantization_config"] = qcfg
        quantized.pop("linears")
        quantized["all_bpw"] = index.total_bytes * 8 / report["total_parameters"]
        report["quantized"] = quantized
    return report


def quantized_summary(index: TensorIndex, qcfg: dict) -> dict:
    """Realized bits per weight: of the decoder linears alone, of lm_head, and per decoder layer (every stored
    byte of a linear over its weights, as the folder's format counts them: OutputFormat.weight_count)."""
    from quantkit.formats.registry import config_format

    fmt = config_format(qcfg)
    linears: dict[str, dict] = {}
    for name in index.infos:
        prefix, _, suffix = name.rpartition(".")
        if suffix == fmt.key_tensor:
            linears[prefix] = {"bits": 0, "numel": 0}
    for name, info in index.infos.items():
        prefix = name.rpartition(".")[0]
        if prefix in linears:
            linears[prefix]["bits"] += info.nbytes * 8
    for prefix, d in linears.items():
        d["numel"] = fmt.weight_count(prefix, index, qcfg)
    layers: dict[int, list[int]] = {}
    head, vision = [0, 0], [0, 0]
    for prefix, d in linears.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", prefix)
        if tensor_part(prefix) == "vision":
            acc = vision
        elif m:
            acc = layers.setdefault(int(m.group(1)), [0, 0])
        else:
            acc = head
        acc[0] += d["bits"]
        acc[1] += d["numel"]
    dec_bits, dec_numel = sum(v[0] for v in layers.values()), sum(v[1] for v in layers.values())
    return {
        "decoder_bpw": dec_bits / dec_numel if dec_numel else None,
        "decoder_quantized_params": dec_numel,
        "head_bpw": head[0] / head[1] if head[1] else None,
        "vision_bpw": vision[0] / vision[1] if vision[1] else None,
        "layer_bpw": {i: v[0] / v[1] for i, v in sorted(layers.items())},
        "quantized_linears": len(linears),
        "linears": linears,
        "key_tensor": fmt.key_tensor,
    }


def format_report(r: dict) -> str:
    p = r["parameters"]
    lines = [
        f"{r['path']}: {r['format']} checkpoint, {r['architecture']}, {r['layers']} layers",
        f"parameters: {r['total_parameters']:,} (text {p['text']:,}, vision {p['vision']:,}, "
        f"projector {p['projector']:,}) in {r['tensors']} tensors",
        f"dtype: {r['dtype']}; size on disk: {r['size_bytes'] / 1e9:.3f} GB",
    ]
    if q := r.get("quantized"):
        qc = r["quantization_config"]
        head = f"{q['head_bpw']:.3f}" if q["head_bpw"] else "16-bit"
        lines.append(
            f"quantized ({qc['quant_method']}): {q['decoder_bpw']:.4f} bits per decoder weight, lm_head {head}, "
            f"{q['all_bpw']:.3f} bits per parameter overall"
        )
        lines.append("layer bpw: " + " ".join(f"{i}:{b:.2f}" for i, b in q["layer_bpw"].items()))
    return "\n".join(lines)


def format_card(r: dict, path: Path) -> str:
    """The card_rows as a markdown table, then for --bpw builds the per-layer allocation table."""
    rows = card_rows(r, path)
    card = "| parameter | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    layers = allocation_rows(r)
    if layers:
        card += "\n\n| layer | bits per weight | predicted KL attn | predicted KL mlp | share of the predicted loss |\n"
        card += "|---|---|---|---|---|\n" + "\n".join(
            f"| {i} | {bpw:.2f} | {attn:.4g} | {mlp:.4g} | {share:.1%} |" for i, bpw, attn, mlp, share in layers
        )
    return card


def allocation_rows(r: dict) -> list[tuple[int, float, float, float, float]]:
    """(layer, realized bpw, predicted KL of its attention and MLP blocks, share of the total) of a --bpw build:
    where the allocator spent bits and how much loss it expects from each layer."""
    qc = r.get("quantization_config") or {}
    alloc = _own_fields(qc).get("allocation")
    q = r.get("quantized") or {}
    if not alloc or not q.get("layer_bpw"):
        return []
    kl = alloc["predicted_kl"]
    total = sum(v for layer in kl for v in layer.values()) or 1.0
    return [(i, bpw, kl[i].get("attn", 0.0), kl[i].get("mlp", 0.0), sum(kl[i].values()) / total)
            for i, bpw in q["layer_bpw"].items() if i < len(kl)]  # fmt: skip


def _own_fields(qc: dict) -> dict:
    """quantkit's own fields (calibration, bpw, allocation) wherever the folder's format keeps them."""
    from quantkit.formats.registry import FORMATS

    fmt = FORMATS.get(qc.get("quant_method"))
    return fmt.own_fields(qc) if fmt is not None else {}


def _damp(value: object) -> str | None:
    """GPTQ's `damp_percent` is a fraction of the mean Hessian diagonal despite its name: say so, not `%`."""
    return None if value is None else f"{value} (fraction of the mean Hessian diagonal)"


def card_rows(r: dict, path: Path) -> list[tuple[str, object]]:
    """The rows TheBloke-style cards carry: bits, head bits, group size, act order, damp, dataset, rows x seq len,
    size, and the eval figures when `quantkit eval --save` left an eval.json in the folder."""
    from quantkit.errors import QuantkitError

    q = r.get("quantized")
    if not q:
        raise QuantkitError(f"{path} is not a quantized folder: --card describes quantized models")
    qc = r["quantization_config"]
    calib = _own_fields(qc).get("calibration") or {}
    bpw = _own_fields(qc).get("bpw")
    bits = f"{bpw} bpw target" if bpw else f"{qc.get('bits')} bits"
    rows = [
        ("Format", qc["quant_method"]),
        ("Bits", f"{bits}, {q['decoder_bpw']:.3f} bits per decoder weight realized"),
        ("Head bits", f"{q['head_bpw']:.2f}" if q["head_bpw"] else "16"),
        ("Vision tower", f"{q['vision_bpw']:.2f} bits" if q.get("vision_bpw") else "16-bit"),
        ("Group size", qc.get("group_size")),
        ("Act order", qc.get("act_order", qc.get("desc_act"))),
        ("Hadamard rotation", bool(qc.get("rotate"))),
        ("Damp", _damp(qc.get("damp_percent"))),
        ("Dataset", calib.get("dataset")),
        ("Rows x seq len", f"{calib.get('rows')} x {calib.get('seq_len')}"),
        ("Size", f"{r['size_bytes'] / 1e9:.2f} GB"),
    ]
    eval_path = Path(path) / "eval.json"
    if eval_path.is_file():
        ev = read_json(eval_path)
        rows.append(
            ("Perplexity", f"{ev['perplexity']:.4f} ({ev.get('dataset')}, {ev.get('rows')} x {ev.get('seq_len')})")
        )
        if ev.get("kl_divergence") is not None:
            rows.append(("KL vs 16-bit", f"{ev['kl_divergence']:.5f}"))
            rows.append(("Top-1 agreement", f"{ev['top1_agreement']:.2%}"))  # as `quantkit eval` prints it
    return rows
