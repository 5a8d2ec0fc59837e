"""`quantkit quantize`: click options and printing around quantkit.quant.pipeline.quantize."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.errors import QuantkitError
from quantkit.formats.registry import FORMATS, MIXED_DEFAULT, UNIFORM_DEFAULT, get_format

GRID_OPTIONS = {"group_size": "--group-size", "act_order": "--act-order / --no-act-order", "sym": "--sym / --asym",
                "static_groups": "--static-groups", "damp": "--damp", "clip": "--clip / --no-clip"}  # GPTQ's alone


def _refuse_grid_options(fmt: str | None) -> None:
    """A trellis format's encoder has no groups, act order, grids or clipping, and damps as exllamav3 does: such
    options given with it would be silently ignored, so they are refused (one line)."""
    from click.core import ParameterSource

    if fmt is None or get_format(fmt).grid_options:
        return
    ctx = click.get_current_context()
    given = [flag for name, flag in GRID_OPTIONS.items()
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]  # fmt: skip
    if given:
        from quantkit.formats.exl3 import SIGMA_REG

        raise QuantkitError(f"--format {fmt} codes without groups, act order, grids or clipping and damps as exllamav3 "
                            f"does ({SIGMA_REG}): drop {', '.join(given)}")  # fmt: skip


def _group_size(value: str) -> int | str | None:
    v = value.lower()
    return None if v in ("none", "-1", "0") else v if v == "auto" else int(v)


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--bpw", type=float, help="Mixed precision: average bits per decoder weight, every byte counted.")
@click.option("--rotate", is_flag=True, help="Randomized Hadamard rotation of input features (quantkit format).")
@click.option("--measurement", type=click.Path(path_type=Path), help="Reuse a measurement.json for --bpw.")
@click.option("--measure-rows", type=int, default=16, show_default=True, help="Calibration rows measured for --bpw.")
@click.option("--measure-for", type=float,
              help="Measure for every --bpw between the target and this one, so that the measurement.json serves "
                   "them all (default: the target and, but for --format exl3 above 2.5, those below it).")  # fmt: skip
@click.option(
    "-b", "--bits", type=int, default=4, show_default=True, help="Bits per weight (2-8; 1-8 with --format exl3)."
)
@click.option(
    "--group-size",
    default="auto",
    show_default=True,
    help="auto (128, else the largest of 64 / 32 that divides every quantized width, else none), 32, 64, "
    "128 or none (per channel).",
)
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="Quantize columns by salience.")
@click.option("--static-groups", is_flag=True, help="With act order, fix the group grids up front.")
@click.option(
    "--sym/--asym",
    default=None,
    help="Symmetric or asymmetric grids (default: --bpw and --format quantkit symmetric at 4 and 8 bits, which the "
    "fast 4/8-bit kernels need, asymmetric at 2 and 3, which lose less; a uniform --format gptq build symmetric, "
    "as GPTQModel loads).",
)
@click.option("--damp", type=float, default=0.01, show_default=True, help="Damping, fraction of mean diag(H).")
@click.option(
    "--clip/--no-clip",
    default=True,
    show_default=True,
    help="Search a clipping factor for each group's scale (as GPTQModel's mse option; grids only, not exl3).",
)
@click.option(
    "--vision",
    type=click.Choice(["keep", "quantize"]),
    default="keep",
    show_default=True,
    help="keep the vision tower 16-bit, or quantize it with --bits on the bundled calibration images.",
)
@click.option("-hb", "--head-bits", type=int, help="Quantize lm_head with these bits (default: keep 16-bit).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(list(FORMATS)),
    default=None,
    help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values())
    + f" (default: {UNIFORM_DEFAULT} for --bits, {MIXED_DEFAULT} for --bpw / --rotate).",
)
@click.option(
    "--codebook",
    type=click.Choice(list(dict.fromkeys(b for f in FORMATS.values() for b in f.codebooks))),
    default=None,
    help="; ".join(f"{f.name}: {', '.join(f.codebooks)} (default {f.codebooks[0]})" for f in FORMATS.values()
                   if f.codebooks) + ". The trellis codebook; other formats have none.",
)
@click.option(
    "--export-names",
    type=click.Choice(["vllm", "gptqmodel"]),
    default="vllm",
    show_default=True,
    help="Tensor names of the export where loaders differ (Mixtral experts, Llava parts): vllm (what vLLM and SGLang "
    "load, the hub's own names) or gptqmodel (what GPTQModel loads). Mistral and Llama get the same names either way.",
)
@click.option("-c", "--dataset", help="A datasets hub name or local .jsonl/.parquet/.txt (default: bundled mix).")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--text-field", default="text", show_default=True, help="Column holding the text.")
@click.option("--rows", type=int, default=128, show_default=True, help="Calibration rows.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per calibration row.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), help="Job folder (default: .DST.quantkit-work).")
@click.option("--offload-dir", type=click.Path(path_type=Path), help="Where hidden states live (default: work dir).")
@click.option("--restart", is_flag=True, help="Discard an unfinished job in the work dir.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto: the GPU if any.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan, the output size and peak memory; write nothing.")
@click.option("--force", is_flag=True, help="Replace a non-empty DST.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize(src: Path, dst: Path, bpw: float | None, rotate: bool, measurement: Path | None, measure_rows: int,
             measure_for: float | None,
             bits: int, group_size: str, act_order: bool, static_groups: bool, sym: bool | None,
             damp: float, clip: bool, vision: str, head_bits: int | None, fmt: str | None, dataset: str | None,
             split: str,
             text_field: str, rows: int, seq_len: int, seed: int, work_dir: Path | None, offload_dir: Path | None,
             restart: bool, device: str,
             dtype: str | None, max_shard_size: str, dry_run: bool, force: bool, quiet: bool,
             export_names: str, codebook: str | None) -> None:  # fmt: skip
    """Quantize a converted model SRC with GPTQ, layer by layer, into DST (resumable: rerun after a crash)."""
    from quantkit.quant.pipeline import quantize as run_quantize
    from quantkit.quant.settings import QuantizeOptions, QuantSettings

    _refuse_grid_options(fmt)
    try:
        gs = _group_size(group_size)
    except ValueError:
        raise QuantkitError(f"--group-size must be auto, 32, 64, 128 or none, got {group_size}") from None
    settings = QuantSettings(bits=bits, group_size=gs, sym=sym, act_order=act_order, static_groups=static_groups,
                             damp=damp, clip=clip, codebook=codebook)  # fmt: skip
    options = QuantizeOptions(
        settings=settings, fmt=fmt or (MIXED_DEFAULT if bpw is not None or rotate else UNIFORM_DEFAULT),
        head_bits=head_bits, bpw=bpw, rotate=rotate, measurement=measurement, measure_rows=measure_rows,
        measure_for=measure_for, vision=vision, dataset=dataset, split=split, text_field=text_field, rows=rows,
        seq_len=seq_len, seed=seed, work_dir=work_dir, offload_dir=offload_dir, restart=restart, force=force,
        dry_run=dry_run, device=device, dtype=dtype, max_shard_size=max_shard_size, export_names=export_names,
    ).check()  # fmt: skip
    plan = run_quantize(src, dst, options, progress=not quiet, log=click.echo)
    if dry_run:
        click.echo(plan.summary())
