"""The model card of a quantized folder: the parameter table GPTQ users expect, and how to load the folder (which
the output format says: formats/, docs/format.md)."""

from __future__ import annotations

from quantkit import __version__
from quantkit.formats.base import OutputFormat
from quantkit.formats.spec import QuantSettings


def model_card(
    name: str,
    fmt: OutputFormat,
    qcfg: dict,
    s: QuantSettings,
    calibration: dict,
    size_bytes: int,
    head_bits: int | None,
    bpw: float | None = None,
    rotate: bool = False,
    arch: str | None = None,
    group_why: str | None = None,
    names: str = "vllm",
) -> str:
    """README.md for the output folder: the parameter table GPTQ users expect, and how to load the folder.
    qcfg: the folder's quantization_config (a mixed GPTQ build's `bits` decides vLLM's kernel).
    group_why: why --group-size auto did not choose 128 (so a card of auto -> 128 equals one of --group-size 128).
    names: the export's naming (--export-names), for which loaders take it."""
    rows = [
        ("Format", fmt.name),
        ("Bits", f"{bpw} bpw (mixed)" if bpw else s.bits),
        ("Head bits", head_bits or 16),
        *fmt.settings_rows(s, rotate, group_why),
        ("Dataset", calibration.get("dataset")),
        ("Rows x seq len", f"{calibration.get('rows')} x {calibration.get('seq_len')}"),
        ("Size", f"{size_bytes / 1e9:.2f} GB"),
        ("Quantizer", f"quantkit {__version__}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    intro = f"Quantized with quantkit ({fmt.method}, calibrated layer by layer)."
    notes = fmt.loading_notes(arch, qcfg, names)
    return f"# {name}\n\n{intro}\n\n| parameter | value |\n|---|---|\n{table}\n\n{notes}"
