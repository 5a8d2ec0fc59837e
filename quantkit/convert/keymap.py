"""Apply an architecture's tables to a checkpoint: expected tensors, and a strict account of what is there.

Every expected native tensor is enumerated from params.json (layers, experts, vision layers), so each source
tensor maps exactly once or is reported; unknown, missing and wrongly shaped tensors are collected and raised
together, so one run tells the user everything that is wrong.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from quantkit.arch import Arch
from quantkit.errors import QuantkitError
from quantkit.io.reader import TensorInfo

_PLACEHOLDER = re.compile(r"\{(\w)\}")


@dataclass(frozen=True)
class TensorMap:
    """One tensor's journey: native name -> HF name, expected shape, part of the model, rotary head count."""

    native: str
    hf: str
    shape: tuple[int, ...]
    part: str
    rope_heads: int | None
    bias: bool


def expand(arch: Arch, dims: dict[str, int]) -> list[TensorMap]:
    """All tensors the architecture expects for these dimensions, in table order (no lm_head when tied)."""
    out = []
    for part, table in arch.tables:
        prefix = arch.text_prefix if part == "text" else ""
        for e in table:
            if e.untied and dims.get("tied"):
                continue
            keys = _PLACEHOLDER.findall(e.native)
            for values in itertools.product(*(range(dims[k]) for k in keys)):
                subs = dict(zip(keys, values, strict=True))
                out.append(
                    TensorMap(
                        native=e.native.format(**subs),
                        hf=prefix + e.hf.format(**subs),
                        shape=tuple(dims[s] for s in e.shape),
                        part=part,
                        rope_heads=dims[e.rope_heads] if e.rope_heads else None,
                        bias=e.bias,
                    )
                )
    return out


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def match(expected: list[TensorMap], source: dict[str, TensorInfo], optional_bias: bool) -> list[TensorMap]:
    """The expected tensors found in source; raise listing unknown, missing and misshapen tensors.

    Bias entries are optional when optional_bias is set (the projector bias comes and goes by checkpoint).
    """
    by_name = {m.native: m for m in expected}
    unknown = [n for n in source if n not in by_name]
    missing = [m.native for m in expected if m.native not in source and not (m.bias and optional_bias)]
    misshapen = [
        f"{m.native} {list(source[m.native].shape)} (params.json says {list(m.shape)})"
        for m in expected
        if m.native in source and source[m.native].shape != m.shape
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown tensor(s): {_listing(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) with wrong shape: {_listing(misshapen, 3)}")
    if problems:
        raise QuantkitError("checkpoint does not match params.json: " + "; ".join(problems))
    return [m for m in expected if m.native in source]
