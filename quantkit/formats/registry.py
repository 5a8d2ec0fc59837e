"""Output formats by name: `quantize --format` takes these names and config.json's quant_method holds them.

`register` adds a format (an OutputFormat instance, formats/base.py); `get_format` finds one by name or by a
folder's quantization_config. Built in: gptq (the default for --bits: every GPTQ loader takes it), quantkit (the
default for --bpw and --rotate: widths mixed within a matrix) and exl3 (ExLlamaV3's trellis code, --bits only).
"""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.exl3_format import Exl3Format
from quantkit.formats.gptq_format import GPTQFormat
from quantkit.formats.quantkit_format import QuantkitFormat

FORMATS: dict[str, OutputFormat] = {f.name: f for f in (GPTQFormat(), QuantkitFormat(), Exl3Format())}
UNIFORM_DEFAULT = GPTQFormat.name  # --bits without --format
MIXED_DEFAULT = QuantkitFormat.name  # --bpw or --rotate without --format


def register(fmt: OutputFormat) -> OutputFormat:
    """Make fmt available by its name (to quantize and to every loader); refused when the name is taken."""
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise QuantkitError(f"an output format named {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get_format(fmt: str | OutputFormat) -> OutputFormat:
    """The format of that name (an OutputFormat passes through)."""
    if isinstance(fmt, OutputFormat):
        return fmt
    if fmt not in FORMATS:
        raise QuantkitError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[fmt]


def config_format(qcfg: dict) -> OutputFormat:
    """The format of a folder's quantization_config (its quant_method), refused when unknown."""
    method = qcfg.get("quant_method")
    if method not in FORMATS:
        raise QuantkitError(f"quantization method {method!r} is not supported ({', '.join(FORMATS)})")
    return FORMATS[method]
