"""The plan of a quantize run (what --dry-run prints): what is quantized and how, the output size, the memory and
the work dir the run needs, and (dry run) the expected time from rates timed on the spot; all from the config and
the model's shapes, before any weight is read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from quantkit.arch.blocks import block_of, role_of, vision_layers
from quantkit.errors import QuantkitError
from quantkit.model.load import Checkpoint
from quantkit.quant.capture import LinearSpec, capture_groups
from quantkit.quant.estimate import COUNT_FLOPS, estimate_seconds, human_seconds, measure_rates
from quantkit.quant.measure import measure_work
from quantkit.quant.settings import QuantizeOptions


@dataclass
class QuantPlan:
    """The --dry-run answer: what will be quantized and how, the output size, and the memory the run needs."""

    layers: int
    quantized_params: int
    kept_params: int
    output_bytes: int
    peak_ram_bytes: int
    peak_device_bytes: int
    device: str
    fmt: str = ""  # the output format's name
    bits: str = ""  # how the decoder is stored, in words
    calibration: str = ""
    work_bytes: int = 0  # the work dir's peak: finished layers (at most the output) and the hidden-state row stores
    seconds: float | None = None  # expected time (dry run only: quant/estimate.py)
    time_basis: str = ""
    group_choice: str = ""  # how --group-size auto resolved, in words ("" when the size was given)

    def summary(self) -> str:
        return "\n".join(
            [
                f"format: {self.fmt}; {self.bits}",
                *([f"group size: {self.group_choice}"] if self.group_choice else []),
                f"calibration: {self.calibration}",
                f"decoder layers: {self.layers}",
                f"quantized parameters: {self.quantized_params:,}; kept 16-bit: {self.kept_params:,}",
                f"output size: {self.output_bytes / 1e9:.2f} GB",
                f"work files: up to {self.work_bytes / 1e9:.2f} GB (finished layers and hidden-state row stores)",
                f"peak memory: {self.peak_ram_bytes / 1e9:.2f} GB RAM"
                + (f", {self.peak_device_bytes / 1e9:.2f} GB on {self.device}" if self.device != "cpu" else ""),
                *([f"expected time: about {human_seconds(self.seconds)} (an estimate: {self.time_basis})"]
                  if self.seconds is not None else []),
            ]
        )  # fmt: skip


def linear_shapes(model, layer_idx: int) -> dict[str, tuple[int, int]]:
    layer = model.layers[layer_idx]
    return {n: tuple(layer.get_submodule(n).weight.shape) for g in capture_groups(layer) for n in g}


def checked_shapes(model, o: QuantizeOptions) -> dict[str, tuple[int, int]]:
    """Every kind of linear the run quantizes, named for error messages: (out, in)."""
    shapes = linear_shapes(model, 0)
    if o.head_bits is not None:
        shapes["lm_head"] = tuple(model.lm_head.weight.shape)
    if o.vision == "quantize":
        if model.vision_tower is None:
            raise QuantkitError("--vision quantize: this model has no vision tower")
        vl = model.get_submodule(vision_layers())[0]
        shapes.update({f"vision {n}": tuple(vl.get_submodule(n).weight.shape) for g in capture_groups(vl) for n in g})
    return shapes


def stored_bits(o: QuantizeOptions, out_f: int, in_f: int, bits: int) -> int:
    """Bits on disk of one linear stored uniformly with `bits` under o's settings and format."""
    spec = LinearSpec(bits, o.settings.group_size, 0 if o.rotate else None)
    return o.format.stored_bits(spec, out_f, in_f, o.settings)


def calibration_words(o: QuantizeOptions) -> str:
    where = o.dataset or "the bundled mix"
    return f"{o.rows} rows x {o.seq_len} tokens from {where}" + (
        f"; --bpw measures on the first {min(o.measure_rows, o.rows)}" if o.bpw is not None else ""
    )


def plan(ckpt: Checkpoint, model, o: QuantizeOptions, bpw_range: tuple[float, float] | None = None) -> QuantPlan:
    """What the run will write and the memory it needs, from the config and the cost model alone."""
    t, s = ckpt.config.text, o.settings
    shapes = linear_shapes(model, 0)
    per_layer = sum(out * i for out, i in shapes.values())
    quantized = per_layer * t.n_layers + (t.vocab_size * t.dim if o.head_bits else 0)
    kept = sum(info.numel for info in ckpt.index.infos.values()) - quantized
    # kept tensors are copied in their stored dtype: count them at the checkpoint's average bytes per parameter
    kept_bytes = kept * sum(i.nbytes for i in ckpt.index.infos.values()) / (kept + quantized)
    if o.bpw is not None:
        layer_bits = per_layer * o.bpw
        lo, hi = bpw_range or (float("nan"), float("nan"))
        words = f"--bpw {o.bpw} (this model reaches {lo:.3f} to {hi:.3f})"
    else:
        layer_bits = sum(stored_bits(o, out, i, s.bits) for out, i in shapes.values())
        words = f"{s.bits} bits ({layer_bits / per_layer:.3f} bits per weight stored)"
    words += f", {o.format.settings_words(s)}"
    head = stored_bits(o, t.vocab_size, t.dim, o.head_bits) if o.head_bits else 0
    output = int((layer_bits * t.n_layers + head) / 8 + kept_bytes)
    largest_in = max(i for _, i in shapes.values())
    largest = max(out * i for out, i in shapes.values())
    layer_bytes = per_layer * 4  # fp32 working copy
    # The solver holds H and two more H-sized tensors at its peak (gptq._inverse_cholesky), and three copies of
    # the weight being solved; one row of activations flows through the layer.
    work = layer_bytes + 3 * largest_in**2 * 4 + 3 * largest * 4 + 4 * o.seq_len * max(t.ffn_dim, t.dim) * 4
    ram_base = 500_000_000  # Python, torch and the row being read
    ram, dev = (ram_base + work, 0) if o.device == "cpu" else (ram_base + layer_bytes, work)
    stores = 4 * o.rows * o.seq_len * t.dim * 4  # as space_needed counts them
    return QuantPlan(t.n_layers, quantized, kept, output, ram, dev, o.device, o.fmt, words, calibration_words(o),
                     output + stores)  # fmt: skip


def with_time(the_plan: QuantPlan, model, o: QuantizeOptions, shapes, t, startup: float) -> QuantPlan:
    """The plan with its expected time: the run's work counted from the shapes, at rates timed on o.device now,
    plus the start-up (importing quantkit, torch and the quantizer, as this process did), which the run pays too."""
    trellis_k = (o.settings.bits if o.bpw is None else round(o.bpw)) if o.format.solver == "trellis" else None
    rates = measure_rates(o.device, o.torch_dtype, o.settings, (o.seq_len, t.dim, t.ffn_dim), trellis_k)
    estimate = partial(
        estimate_seconds, shapes, capture_groups(model.layers[0]), rows=o.rows, seq_len=o.seq_len,
        attn_dim=t.n_heads * t.head_dim, head=(t.vocab_size, t.dim) if o.head_bits else None,
        measure=measure_work(o.format, min(o.measure_rows, o.rows), (t.vocab_size, t.dim), shapes[0], o.settings,
                             t.n_experts > 0, o.measure_reach, o.measure_floor)
        if o.bpw is not None and o.measurement is None else None, block_of=block_of, role_of=role_of,
    )  # fmt: skip
    seconds, flops = startup + estimate(rates=rates), estimate(rates=COUNT_FLOPS)
    basis = (f"{flops / 1e15:,.3g} PFLOP of work counted from the model's shapes at {rates.matmul / 1e9:.3g} "
             f"GFLOP/s matmul and "
             f"{rates.cholesky / 1e9:.3g} GFLOP/s Cholesky timed on {o.device} just now, and {startup:.1f} s of "
             "start-up (imports) as this process took; reading and writing the "
             "checkpoint" + (" and the vision tower" if o.vision == "quantize" else "") + " not counted"
             + (f"; the trellis encoding at {rates.trellis * 1e6:.0f} µs per weight (K = {trellis_k}, timed just "
                "now; a wider K range costs more per weight at lower K)" if trellis_k is not None else ""))  # fmt: skip
    return replace(the_plan, seconds=seconds, time_basis=basis)
