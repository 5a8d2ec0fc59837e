"""Which solver quantizes a linear for an output format: GPTQ for the grid formats, the trellis encoder for EXL3.

A format names its solver (OutputFormat.solver); a solver takes (weight [out, in], H [in, in], LinearSpec,
QuantSettings) and returns what the format's `tensors` stores, with `weight` (the dequantized weight the next
capture groups see), `rel_loss` and `damp`.
"""

from __future__ import annotations

from collections.abc import Callable

from quantkit.quant.capture import solve_linear
from quantkit.quant.trellis import solve_trellis

SOLVERS: dict[str, Callable] = {"gptq": solve_linear, "trellis": solve_trellis}
