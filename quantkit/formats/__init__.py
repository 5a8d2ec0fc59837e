"""Storage formats of quantized weights: the quantkit packed format (packed.py), its Hadamard rotation
(hadamard.py), the int32 bit packing both use (bits.py) and the GPTQ checkpoint layout in both directions (gptq.py).

Each output format is also an object (base.py: what the quantizer and the loader ask of it; gptq_format.py,
quantkit_format.py), found by name in registry.py, which `quantize --format` and config.json's quant_method use.
The registry is not imported here: its formats build the kernels' modules, and the kernels import this package."""

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

__all__ = [
    "FORMAT_VERSION",
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
