"""What a quantized model folder holds: packed tensors per linear, quantization_config, a model card.

Formats: `gptq` is the GPTQ checkpoint layout (qweight / qzeros / scales / g_idx, docs/format.md) that
transformers, GPTQModel, vLLM and ExLlamaV2 load, for uniform bits. The project's own mixed-bit format comes
with the --bpw allocator.
"""

from __future__ import annotations

from quantkit import __version__
from quantkit.quant.capture import QuantSettings
from quantkit.quant.gptq import GPTQResult
from quantkit.quant.pack import gptq_pack

FORMATS = ("gptq",)


def linear_tensors(fmt: str, res: GPTQResult) -> dict[str, object]:
    """The stored tensors of one quantized linear, by suffix (`qweight`, ...), for the given format."""
    if fmt == "gptq":
        return gptq_pack(res.q, res.scales, res.zeros, res.g_idx, res.bits)
    raise ValueError(fmt)


def quantization_config(fmt: str, s: QuantSettings, calibration: dict, head_bits: int | None) -> dict:
    """The `quantization_config` block of config.json."""
    cfg = {
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
    return cfg


def model_card(name: str, fmt: str, s: QuantSettings, calibration: dict, size_bytes: int, head_bits: int | None):
    """README.md for the output folder: the parameter table GPTQ users expect."""
    rows = [
        ("Format", fmt),
        ("Bits", s.bits),
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
