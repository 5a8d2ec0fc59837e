"""Everything `quantkit quantize` is asked to do, checked in one place before any work starts.

QuantSettings are the GPTQ knobs (what a measurement and a job depend on); QuantizeOptions are the whole request.
`QuantizeOptions.check()` refuses bad arguments (types, ranges, NaN/inf, devices, sizes) without reading the model;
`check_against_model` refuses what only the model can tell (group sizes that do not divide its features, a --bpw
outside the range its shapes reach under the cost model, an already-quantized source, a measurement of another
length). Both raise QuantkitError with one line. `resolve_group_size` turns --group-size auto into the concrete size
the model's shapes allow, before any work, so everything after it (job, measurement, config) sees a number.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from quantkit.arch.mistral import EXPORT_NAMINGS
from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import UNIFORM_DEFAULT, get_format
from quantkit.formats.spec import QuantSettings
from quantkit.io.writer import parse_shard_size
from quantkit.model.config import CONFIG_DTYPES
from quantkit.quant.measure import floor_for

AUTO = "auto"
GROUP_SIZES = (AUTO, 32, 64, 128, None)
VISION_MODES = ("keep", "quantize")


@dataclass(frozen=True)
class QuantizeOptions:
    """One quantize request besides SRC and DST (the CLI's options, with the library's defaults)."""

    settings: QuantSettings = field(default_factory=QuantSettings)
    fmt: str = UNIFORM_DEFAULT  # an output format's name (formats/registry.py)
    head_bits: int | None = None
    bpw: float | None = None
    rotate: bool = False
    measurement: Path | None = None
    measure_rows: int = 16
    measure_for: float | None = None  # a new measurement serves every --bpw between bpw and measure_for
    vision: str = "keep"
    dataset: str | None = None
    split: str = "train"
    text_field: str = "text"
    rows: int = 128
    seq_len: int = 2048
    seed: int = 0
    work_dir: Path | None = None
    offload_dir: Path | None = None
    restart: bool = False
    force: bool = False
    dry_run: bool = False
    device: str = "auto"
    dtype: str | None = None
    max_shard_size: str = "5GB"
    export_names: str = "vllm"  # whose tensor names the export carries (quantkit.arch EXPORT_NAMINGS)

    def check(self) -> QuantizeOptions:
        """Refuse bad arguments; returns self with the device resolved (auto -> cuda when there is one, else cpu)."""
        s = self.settings
        fmt = get_format(self.fmt)
        if not (isinstance(s.bits, int) and 1 <= s.bits <= 8):  # which widths within 1..8: the format says below
            lo, hi = min(fmt.widths), max(fmt.widths)
            raise QuantkitError(f"--bits must be between {lo} and {hi}, got {s.bits}")
        fmt.check(s, self.bpw, self.rotate)
        if self.head_bits is not None and not (isinstance(self.head_bits, int) and 2 <= self.head_bits <= 8):
            raise QuantkitError(f"--head-bits must be between 2 and 8, got {self.head_bits}")
        if s.group_size not in GROUP_SIZES:
            raise QuantkitError(f"--group-size must be auto, 32, 64, 128 or none, got {s.group_size}")
        if not (isinstance(s.damp, int | float) and math.isfinite(s.damp) and 0 <= s.damp <= 1):
            raise QuantkitError(f"--damp must be a fraction from 0 to 1 of mean(diag H), got {s.damp}")
        if self.export_names not in EXPORT_NAMINGS:
            raise QuantkitError(f"--export-names must be {' or '.join(EXPORT_NAMINGS)}, got {self.export_names!r}")
        if self.vision not in VISION_MODES:
            raise QuantkitError(f"--vision must be keep or quantize, got {self.vision!r}")
        asked = {"head": (self.head_bits is not None, "lm_head", "--head-bits"),
                 "vision": (self.vision == "quantize", "vision tower", "--vision quantize")}  # fmt: skip
        for part, (wanted, words, flag) in asked.items():
            if wanted and part not in fmt.parts:
                raise QuantkitError(f"--format {fmt.name} does not store a quantized {words} yet: drop {flag}")
        if self.bpw is not None:
            if not math.isfinite(self.bpw) or self.bpw <= 0:
                raise QuantkitError(f"--bpw must be a positive number of bits per weight, got {self.bpw}")
            if self.measure_rows < 1:
                raise QuantkitError(f"--measure-rows must be at least 1, got {self.measure_rows}")
        if self.measure_for is not None:
            if self.bpw is None:
                raise QuantkitError("--measure-for goes with --bpw (it says which targets a measurement serves)")
            if self.measurement is not None:
                raise QuantkitError("--measure-for is for a new measurement; --measurement reuses one as it was made")
            if not math.isfinite(self.measure_for) or self.measure_for <= 0:
                raise QuantkitError(f"--measure-for must be a positive number of bits per weight, got "
                                    f"{self.measure_for}")  # fmt: skip
        for name, value in (("--rows", self.rows), ("--seq-len", self.seq_len)):
            if value < 1:
                raise QuantkitError(f"{name} must be at least 1, got {value}")
        parse_shard_size(self.max_shard_size)
        if self.dtype is not None and self.dtype not in CONFIG_DTYPES:
            raise QuantkitError(f"--dtype must be one of {', '.join(CONFIG_DTYPES)}, got {self.dtype!r}")
        if s.codebook is None and fmt.codebooks:  # resolved here: job, measurement and config see the concrete one
            s = replace(s, codebook=fmt.codebooks[0])
        if s.sym is None and self.bpw is None and fmt.uniform_sym is not None:
            s = replace(s, sym=fmt.uniform_sym)
        return replace(self, settings=s, device=resolve_device(self.device))

    @property
    def format(self) -> OutputFormat:
        """The output format object of fmt."""
        return get_format(self.fmt)

    @property
    def measure_reach(self) -> float | None:
        """The most bits per weight a new measurement's candidates store: what every --bpw up to max(bpw,
        measure_for) may use (OutputFormat.reach_for; None: the whole table)."""
        return None if self.bpw is None else self.format.reach_for(max(self.bpw, self.measure_for or self.bpw))

    @property
    def measure_floor(self) -> float | None:
        """The narrowest width a new measurement's candidates give a linear: what every --bpw down to min(bpw,
        measure_for) may use (measure.floor_for; None: down to the table's narrowest)."""
        return None if self.bpw is None else floor_for(self.format, min(self.bpw, self.measure_for or self.bpw))

    @property
    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU, bfloat16 on a GPU, unless --dtype says otherwise."""
        return CONFIG_DTYPES[self.dtype or ("float32" if self.device == "cpu" else "bfloat16")]


def resolve_device(spec: str) -> str:
    """auto -> cuda when a GPU is visible, else cpu; cpu, cuda and cuda:N are checked against this machine."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(spec)
    except RuntimeError:
        raise QuantkitError(f"unknown device {spec!r} (cpu, cuda, cuda:N or auto)") from None
    if d.type == "cpu":
        return "cpu"
    if d.type != "cuda":
        raise QuantkitError(f"device type {d.type} is not supported (cpu, cuda, cuda:N or auto)")
    if not torch.cuda.is_available():
        raise QuantkitError(f"--device {spec}: CUDA is not available here (use --device cpu)")
    if (d.index or 0) >= torch.cuda.device_count():
        raise QuantkitError(f"--device {spec} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return spec


def check_against_model(o: QuantizeOptions, config: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """What the model decides: an already-quantized source, and group sizes / GPTQ shapes its linears allow.

    config is the source's config.json; shapes maps a description of every linear to be quantized to (out, in).
    """
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"  # fmt: skip
        raise QuantkitError(f"the source is already quantized ({method}): quantize a converted 16-bit model")
    g = o.settings.group_size
    for name, (out_f, in_f) in shapes.items():
        if g and in_f % g:
            raise QuantkitError(f"--group-size {g} does not divide {name}'s {in_f} input features")
        o.format.check_shape(name, out_f, in_f)


def resolve_group_size(shapes: dict[str, tuple[int, int]]) -> tuple[int | None, str]:
    """--group-size auto: the largest of 128 / 64 / 32 that divides every quantized linear's input features, else
    None (per channel), so that the default works on any model; returns it and why, for the log and the card."""
    blocker = ""
    for g in (128, 64, 32):
        name, in_f = next(((n, i) for n, (_, i) in shapes.items() if i % g), (None, 0))
        if name is None:
            return g, blocker
        blocker = f"{g} does not divide {name}'s {in_f} input features"
    return None, blocker


def group_size_words(g: int | None, why: str) -> str:
    """How auto resolved, for the log and the dry run: "auto -> 64 (128 does not divide ...)"."""
    return f"auto -> {g or 'none, per channel'}" + (f" ({why})" if why else "")


def check_bpw_reachable(bpw: float, lo: float, hi: float) -> None:
    """--bpw against the range the cost model gives for this model (no measurement needed)."""
    if not lo - 1e-12 <= bpw <= hi + 1e-12:
        raise QuantkitError(f"--bpw {bpw} is outside what this model can reach: {lo:.3f} to {hi:.3f}")


def rotate_seeds(rotate: bool) -> Callable[[int, str], int | None]:
    """A fixed seed per linear (from its name) for the randomized Hadamard signs, or None without --rotate."""
    return (lambda i, name: zlib.crc32(f"layers.{i}.{name}".encode())) if rotate else (lambda i, name: None)
