"""The words the quantizer and the formats share: GPTQ settings, how one linear is stored, a block's candidate.

They live below both (formats import nothing from quant), so a format can say which settings it stores and what
they cost without knowing how the quantizer finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

SYM_FROM = 4  # the narrowest width whose grid is symmetric unless --sym / --asym says otherwise
PER_CHANNEL = 0  # a candidate's group size meaning one scale per output row (no groups)
Segments = tuple[tuple[int, float], ...]  # ((bits, fraction of columns), ...), most salient first


@dataclass(frozen=True)
class QuantSettings:
    """The GPTQ knobs users know from published GPTQ releases."""

    bits: int = 4
    group_size: int | str | None = 128  # "auto" is resolved by quant.settings.resolve_group_size before any work
    sym: bool | None = None  # None: symmetric at SYM_FROM bits and up, asymmetric below (sym_for)
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.01
    clip: bool = True  # search each group's clipping (GPTQ's --mse): 0.58x the real model's 3-bit KL
    codebook: str | None = None  # a trellis format's codebook (None: the format's default; others take none)

    def sym_for(self, bits: int | tuple[tuple[int, int], ...] | list) -> bool:
        """Whether a linear stored at these bits (a width, or a layout of (bits, n) segments) has a symmetric grid.
        Unset, it follows the width: the fast 4- and 8-bit kernels (Marlin, Machete) need symmetric grids and no
        symmetric-only kernel runs 2 or 3 bits, where an asymmetric grid loses far less (the real model's --bpw
        3.0 KL 2.65 -> 1.26; benchmarks/RESULTS.md). A mixed layout follows its narrowest width."""
        if self.sym is not None:
            return self.sym
        return (bits if isinstance(bits, int) else min(b for b, _ in bits)) >= SYM_FROM

    def sym_words(self) -> str:
        """The symmetry setting as a plan or a model card says it."""
        if self.sym is not None:
            return "sym" if self.sym else "asym"
        return f"sym at {SYM_FROM}+ bits, asym below"


@dataclass(frozen=True)
class LinearSpec:
    """How one linear is stored: uniform bits or a mixed layout [(bits, n_cols), ...] in quantization order, its
    group size, and the seed of a randomized Hadamard rotation of its input features (None = not rotated)."""

    bits: int | tuple[tuple[int, int], ...]
    group_size: int | None
    rotate_seed: int | None = None


@dataclass(frozen=True)
class Candidate:
    """One way to store a block: per role, the segments and the group size (None = the run's --group-size,
    PER_CHANNEL = no groups)."""

    name: str
    roles: tuple[tuple[str, Segments, int | None], ...]

    def for_role(self, role: str) -> tuple[Segments, int | None]:
        return next((segs, g) for r, segs, g in self.roles if r == role)
