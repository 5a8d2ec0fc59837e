"""What an output format is to the quantizer and to the loader: one object per format (formats/registry.py).

The quantizer asks a format which settings it can store (its candidates for --bpw and the widths it takes), what
a setting costs in stored bits, the tensors of a solved linear and the quantization_config it writes; the loader
asks it whether a module's tensors are its own and for the module that runs them. Everything else (calibration,
capture, GPTQ, allocation, assembly, the model) is the same for every format, so a new format is one subclass and
one `register` call: tests/test_formats.py registers a toy one from the test file alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.spec import Candidate, LinearSpec, QuantSettings


class SolvedLinear(Protocol):
    """What a format reads of a solved linear (quant.capture.Solved): the GPTQ result and the rotation."""

    result: object  # quant.gptq.GPTQResult: q, scales, zeros, g_idx, perm, bits, weight
    had_in: torch.Tensor | None
    had_in_block: int

    @property
    def weight(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Built:
    """What a finished run made, for the quantization_config its format writes.

    specs: per decoder layer, each linear's LinearSpec by its name in the layer (e.g. "self_attn.q_proj");
    export(name, naming): a model name (e.g. "layers.3.self_attn.q_proj") as the export spells it under a naming of
    quantkit.arch EXPORT_NAMINGS; predicted: the allocator's predicted KL per layer and block (--bpw only); shapes:
    per decoder layer, each linear's (out, in) by the same names (None where the caller has none); head_shape:
    lm_head's (out, in) when it is quantized."""

    settings: QuantSettings
    calibration: dict
    head_bits: int | None
    bpw: float | None
    rotate: bool
    specs: list[dict[str, LinearSpec]]
    export: Callable[[str, str], str]
    export_names: str
    vision: bool  # the model has a vision tower
    vision_bits: int | None  # its linears' width when --vision quantize, else None (kept 16-bit)
    predicted: list[dict[str, float]] | None = None
    shapes: list[dict[str, tuple[int, int]]] | None = None
    head_shape: tuple[int, int] | None = None


class OutputFormat:
    """One storage format of quantized linears. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # --format NAME and config.json's quant_method
    help: ClassVar[str]  # one line for --help
    widths: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)  # what --bits may be
    key_tensor: ClassVar[str]  # the stored tensor whose presence under a module's prefix says it is quantized
    markers: ClassVar[frozenset[str]]  # every tensor suffix only this format stores (strays and gaps are refused)
    header_tensors: ClassVar[frozenset[str]] = frozenset()  # small tensors the loader reads to shape the rest
    rotates: ClassVar[bool] = False  # stores a Hadamard rotation of input features (--rotate)
    codebooks: ClassVar[tuple[str, ...]] = ()  # the codebooks it codes with (--codebook), its default first
    mixed_matrix: ClassVar[bool] = False  # one matrix may hold several widths (--bpw may widen single linears)
    uniform_sym: ClassVar[bool | None] = None  # the grid of a uniform build without --sym / --asym (None: by width)
    solver: ClassVar[str] = "gptq"  # what quantizes a linear for it (quant/solvers.py): "gptq" or "trellis"
    method: ClassVar[str] = "GPTQ"  # the model card's words for how its linears were quantized
    grid_options: ClassVar[bool] = True  # its solver reads --group-size, --act-order, --sym, --damp and --clip
    parts: ClassVar[frozenset[str]] = frozenset({"decoder", "head", "vision"})  # what it can store quantized
    # --bpw: how many bits per weight above the target a block's candidates may store (a format with one width per
    # matrix: each linear's width; measured and chosen, the measurement's time goes with their number); None: the
    # whole table, whatever the target
    reach: ClassVar[float | None] = None
    # and how many below it each linear may be (None: down to the table's narrowest). A format whose narrowest widths
    # cost the most to measure and are never chosen near the target sets it: EXL3's K = 1 trellis encode is its
    # slowest, and --bpw 3.0 does not pick it
    reach_below: ClassVar[float | None] = None

    # The quantizer's side.
    def reach_for(self, target: float | None) -> float | None:
        """The most bits per weight a block's candidates may store for this --bpw target (None: the whole table)."""
        return None if target is None or self.reach is None else target + self.reach

    def floor_for(self, target: float | None) -> float | None:
        """The fewest bits per weight each linear of a block's candidates may have for this --bpw target (None: any)."""
        return None if target is None or self.reach_below is None else target - self.reach_below

    def target_for(self, reach: float) -> float:
        """The highest --bpw target a measurement of the candidates up to reach serves (reach_for's inverse)."""
        return reach - (self.reach or 0.0)

    def check(self, s: QuantSettings, bpw: float | None, rotate: bool) -> None:
        """Refuse settings this format cannot store (one line, before any work)."""
        if s.bits not in self.widths:
            raise QuantkitError(f"--format {self.name} stores {', '.join(map(str, self.widths))} bits, not {s.bits}")
        if rotate and not self.rotates:
            raise QuantkitError(f"--format {self.name} stores no rotation: drop --rotate")
        if s.codebook is not None and s.codebook not in self.codebooks:
            raise QuantkitError(f"--format {self.name} codes with {', '.join(self.codebooks)}, not {s.codebook}"
                                if self.codebooks else f"--format {self.name} has no codebook: drop --codebook")

    def settings_rows(self, s: QuantSettings, rotate: bool, group_why: str | None = None) -> list[tuple[str, object]]:
        """The solver's settings as the model card lists them (GPTQ's: rotation, group size, act order, grid and
        damp). group_why: why --group-size auto did not choose 128."""
        group = s.group_size or "none (per channel)"
        if group_why:
            group = f"{s.group_size or 'none, per channel'} (auto: {group_why})"
        return [("Hadamard rotation", rotate), ("Group size", group), ("Act order", s.act_order),
                ("Grid", s.sym_words()), ("Damp", f"{s.damp} (fraction of the mean Hessian diagonal)")]  # fmt: skip

    def settings_words(self, s: QuantSettings) -> str:
        """The solver's settings in the plan line (what --dry-run prints)."""
        return f"group {s.group_size or 'none'}, act order {'on' if s.act_order else 'off'}, {s.sym_words()}"

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Refuse a linear this format cannot store (named in the error)."""

    def candidates(self, block: str, moe: bool) -> list[Candidate]:
        """The ways --bpw may store a block ("attn" or "mlp"; moe: a sparse MoE's experts)."""
        raise QuantkitError(f"--format {self.name} takes --bits only, not --bpw")

    def stored_bits(self, spec: LinearSpec, out_features: int, in_features: int, s: QuantSettings) -> int:
        """Exact bits on disk of an [out, in] linear stored with spec (what the allocator budgets)."""
        raise NotImplementedError

    def tensors(self, solved: SolvedLinear) -> dict[str, torch.Tensor]:
        """The stored tensors of one solved linear, by suffix (e.g. `qweight`)."""
        raise NotImplementedError

    def quantization_config(self, b: Built) -> dict:
        """config.json's quantization_config for a finished run."""
        raise NotImplementedError

    def weight_count(self, prefix: str, index, qcfg: dict) -> int:
        """How many weights the linear stored under prefix has (in x out), from its tensors (index: the folder's
        TensorIndex) or the config: what `inspect` divides its stored bits by."""
        raise NotImplementedError

    def own_fields(self, qcfg: dict) -> dict:
        """Where quantkit's own fields (calibration, bpw, allocation) sit in this format's quantization_config."""
        return qcfg

    def measurement_key(self) -> dict:
        """What a --bpw measurement records of the format (its candidates depend on it)."""
        return {"format": self.name}

    def loading_notes(self, arch: str | None, qcfg: dict, names: str) -> str:
        """The model card's "Loading" section: which loaders take a folder of this format, and how."""
        return f"## Loading\n\nThe {self.name} format is read by quantkit: `quantkit run DIR`, `quantkit eval DIR`.\n"

    # The loader's side.
    def check_config(self, qcfg: dict) -> None:
        """Refuse a quantization_config this format cannot run (one line, before any weight is read)."""

    def linear(
        self, qcfg: dict, prefix: str, tensors: dict[str, torch.Tensor], backend: str, shape: tuple[int, int] | None
    ) -> nn.Module:
        """The module that runs the linear stored under prefix, [out, in] = shape (the model's; None when only
        the stored tensors are checked). tensors: every stored tensor of the module, on the meta device except
        header_tensors; the module's buffers must take the stored tensors by suffix (the checkpoint loader fills
        them part by part)."""
        raise NotImplementedError

    def repack(self, module: nn.Module, backend: str) -> nn.Module:
        """The loader's explicit step once a module built by `linear` holds its tensors: the module that runs them
        (GPTQ's stored tensors become a QuantLinear); a module that runs as loaded is returned as it is."""
        return module
