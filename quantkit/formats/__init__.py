"""Storage formats of quantized weights: the quantkit packed format (packed.py), its Hadamard rotation
(hadamard.py), the int32 bit packing both use (bits.py) and the GPTQ checkpoint layout in both directions (gptq.py).

OUTPUT_FORMATS names them once, as `quantize --format` takes them and as config.json's quant_method writes them."""

from quantkit.formats.gptq import dequantize_gptq, from_gptq, pack_gptq_result
from quantkit.formats.packed import (
    FORMAT_VERSION,
    PackedLinear,
    Segment,
    dequantize,
    from_tensors,
    pack_linear,
    padded_layout,
    plane_widths,
    stored_bits,
    stored_bits_for,
    to_tensors,
    unpack_codes,
)

OUTPUT_FORMATS = ("gptq", "quantkit")

__all__ = [
    "FORMAT_VERSION",
    "OUTPUT_FORMATS",
    "PackedLinear",
    "Segment",
    "dequantize",
    "dequantize_gptq",
    "from_gptq",
    "from_tensors",
    "pack_gptq_result",
    "pack_linear",
    "padded_layout",
    "plane_widths",
    "stored_bits",
    "stored_bits_for",
    "to_tensors",
    "unpack_codes",
]
