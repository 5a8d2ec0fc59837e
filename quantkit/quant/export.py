"""What a quantized model folder holds: packed tensors per linear, quantization_config, a model card.

Formats (docs/format.md): `gptq` is the GPTQ checkpoint layout (qweight / qzeros / scales / g_idx) that
transformers, GPTQModel, vLLM and ExLlamaV2 load, for uniform bits; `quantkit` is the project's own layout
(bit planes, segments of mixed widths, act order as an input permutation), which the --bpw builds need.
"""

from __future__ import annotations

import torch

from quantkit import __version__
from quantkit.formats.gptq import gptq_pack, pack_gptq_result
from quantkit.formats.packed import FORMAT_VERSION, to_tensors
from quantkit.quant.capture import QuantSettings, Solved

FORMATS = ("gptq", "quantkit")


def linear_tensors(fmt: str, solved: Solved) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear, by suffix (`qweight`, `qmeta`, ...), for the given format."""
    res = solved.result
    if fmt == "gptq":
        return gptq_pack(res.q, res.scales, res.zeros, res.g_idx, res.bits)
    return to_tensors(pack_gptq_result(res, had_in=solved.had_in, had_in_block=solved.had_in_block))


def build_quantization_config(fmt: str, s: QuantSettings, calibration: dict, head_bits: int | None) -> dict:
    """The `quantization_config` block of config.json."""
    if fmt == "quantkit":
        return {
            "quant_method": "quantkit",
            "format_version": FORMAT_VERSION,
            "bits": s.bits,
            "head_bits": head_bits,
            "group_size": s.group_size or -1,
            "act_order": s.act_order,
            "sym": s.sym,
            "damp_percent": s.damp,
            "clip": s.clip,
            "calibration": calibration,
            "producer": f"quantkit {__version__}",
        }
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": s.bits,
        "group_size": s.group_size or -1,
        "desc_act": s.act_order,
        "sym": s.sym,
        "static_groups": s.static_groups,
        "damp_percent": s.damp,
        "true_sequential": True,
        "lm_head": head_bits is not None,
        "meta": {"quantizer": [f"quantkit:{__version__}"]},
        "quantkit": {"calibration": calibration, "clip": s.clip},
    }


def model_card(
    name: str,
    fmt: str,
    s: QuantSettings,
    calibration: dict,
    size_bytes: int,
    head_bits: int | None,
    bpw: float | None = None,
    rotate: bool = False,
) -> str:
    """README.md for the output folder: the parameter table GPTQ users expect."""
    rows = [
        ("Format", fmt),
        ("Bits", f"{bpw} bpw (mixed)" if bpw else s.bits),
        ("Hadamard rotation", rotate),
        ("Head bits", head_bits or 16),
        ("Group size", s.group_size or "none (per channel)"),
        ("Act order", s.act_order),
        ("Symmetric", s.sym),
        ("Damp %", s.damp),
        ("Dataset", calibration.get("dataset")),
        ("Rows x seq len", f"{calibration.get('rows')} x {calibration.get('seq_len')}"),
        ("Size", f"{size_bytes / 1e9:.2f} GB"),
        ("Quantizer", f"quantkit {__version__}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    intro = "Quantized with quantkit (GPTQ, calibrated layer by layer)."
    return f"# {name}\n\n{intro}\n\n| parameter | value |\n|---|---|\n{table}\n"
