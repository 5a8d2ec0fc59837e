"""The `quantkit` command line: a thin layer over the package's functions.

Every user-facing failure is a QuantkitError, printed as one `error:` line with exit code 1; usage errors
exit 2 (click's convention), Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from quantkit import __version__
from quantkit.errors import QuantkitError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # a full disk, a read-only folder, a vanished file: the path and the reason
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except RecursionError:
            click.echo("error: input nested too deeply", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def main() -> None:
    """quantkit: Mistral-native checkpoints -> Hugging Face layout -> quantized models that run on one GPU."""


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (5GB, 500MB, 2GiB).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), help="Cast floating tensors.")
@click.option(
    "--projector-bias",
    type=click.Choice(["auto", "drop", "zeros"]),
    default="auto",
    show_default=True,
    help="auto: follow the checkpoint; drop: write no projector bias; zeros: write zero biases (older loaders).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--force", is_flag=True, help="Replace a non-empty DST.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(
    src: Path,
    dst: Path,
    max_shard_size: str,
    dtype: str | None,
    projector_bias: str,
    dry_run: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Convert a Mistral-native checkpoint SRC (params.json + consolidated*.safetensors) to the HF layout in DST."""
    from quantkit.convert.pipeline import convert as run_convert

    plan = run_convert(
        src,
        dst,
        max_shard_size=max_shard_size,
        dtype=dtype,
        projector_bias=projector_bias,
        dry_run=dry_run,
        force=force,
        progress=not quiet,
    )
    click.echo(plan.summary())
    if not dry_run:
        click.echo(f"wrote {dst}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--card", is_flag=True, help="A model-card table (markdown) for a quantized folder.")
def inspect(path: Path, as_json: bool, card: bool) -> None:
    """Describe a native, HF or quantized model folder: format, architecture, parameters, dtype, size."""
    from quantkit.inspect import describe, format_card, format_report

    report = describe(path)
    if card:
        click.echo(format_card(report, path))
    else:
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--messages", "messages_file", required=True, type=click.Path(path_type=Path), help="OpenAI chat JSON.")
@click.option("--tools", "tools_file", type=click.Path(path_type=Path), help="OpenAI function tools JSON.")
@click.option("--json", "as_json", is_flag=True, help='Print {"input_ids": [...], "images": [{"height", "width"}]}.')
def tokenize(model: Path, messages_file: Path, tools_file: Path | None, as_json: bool) -> None:
    """Show the prompt a model folder MODEL builds from a chat (special tokens visible) and its token count."""
    from quantkit.tokenizer.command import tokenize_report

    click.echo(tokenize_report(model, messages_file, tools_file, as_json))


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", help="Answer this prompt and exit. Without it: an interactive chat on stdin.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable).")
@click.option("--system", help="System prompt.")
@click.option("--max-new-tokens", default=512, show_default=True, type=int, help="At least 1.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling, for reproducible answers.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="cpu, cuda, cuda:N, a list (cuda:0,cuda:1), or auto: every GPU, layers split by free memory, else CPU.",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
    default="auto",
    show_default=True,
    help="auto: the checkpoint's dtype on GPU, float32 on CPU.",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "triton", "torch"]),
    default="auto",
    show_default=True,
    help="Quantized matmuls: auto = Triton on GPU, torch reference on CPU.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per answer (ids, text, tokens/s).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run_command(
    model: Path,
    prompt: str | None,
    images: tuple[Path, ...],
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    device: str,
    dtype: str,
    backend: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Chat with a converted or quantized model folder MODEL (Mistral, Mixtral, or Pixtral with images)."""
    from functools import partial

    from quantkit.model.run import Sampling, run
    from quantkit.runtime import load_any

    if max_new_tokens < 1:
        raise QuantkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    load = partial(load_any, backend=backend)
    run(model, prompt, list(images), system, sampling, device, dtype, as_json, progress=not quiet, load=load)


@main.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), help="Model to compare with (e.g. the 16-bit one).")
@click.option("-c", "--dataset", help="A datasets hub name or local .jsonl/.parquet/.txt (default: bundled mix).")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--text-field", default="text", show_default=True, help="Column holding the text.")
@click.option("--rows", type=click.IntRange(min=1), default=32, show_default=True, help="Rows of tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens per row.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Row seed (quantize calibrates with 0).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, a list, or auto.")
@click.option(
    "--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True
)
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--save", is_flag=True, help="Also write the figures to MODEL/eval.json (inspect --card shows them).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(model: Path, reference: Path | None, dataset: str | None, split: str, text_field: str, rows: int,
                 seq_len: int, seed: int, device: str, dtype: str, backend: str, as_json: bool, save: bool,
                 quiet: bool) -> None:  # fmt: skip
    """Perplexity of MODEL (float or quantized); with --reference, mean KL divergence and top-1 agreement too."""
    from quantkit.eval_command import EvalSettings, check_save, format_table, run_eval, save_figures

    save_path = check_save(model) if save and Path(model).is_dir() else None
    settings = EvalSettings(dataset, split, text_field, rows, seq_len, seed, device, dtype, backend)
    result = run_eval(model, reference, settings, progress=not quiet)
    click.echo(json.dumps(result.as_dict()) if as_json else format_table(result, model, reference, settings))
    if save_path is not None:
        figures = {**result.as_dict(), "dataset": dataset or "bundled mix", "rows": rows, "seq_len": seq_len,
                   "reference": str(reference) if reference else None}  # fmt: skip
        save_figures(save_path, figures)


def _group_size(value: str) -> int | None:
    return None if value.lower() in ("none", "-1", "0") else int(value)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--bpw", type=float, help="Mixed precision: average bits per decoder weight, every byte counted.")
@click.option("--rotate", is_flag=True, help="Randomized Hadamard rotation of input features (quantkit format).")
@click.option("--measurement", type=click.Path(path_type=Path), help="Reuse a measurement.json for --bpw.")
@click.option("--measure-rows", type=int, default=16, show_default=True, help="Calibration rows measured for --bpw.")
@click.option("-b", "--bits", type=int, default=4, show_default=True, help="Bits per weight (2-8).")
@click.option("--group-size", default="128", show_default=True, help="32, 64, 128 or none (per channel).")
@click.option("--act-order/--no-act-order", default=True, show_default=True, help="Quantize columns by salience.")
@click.option("--static-groups", is_flag=True, help="With act order, fix the group grids up front.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric or asymmetric grids.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Damping, fraction of mean diag(H).")
@click.option("--clip", is_flag=True, help="Search a clipping factor for each group's scale.")
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
    type=click.Choice(["gptq", "quantkit"]),
    default=None,
    help="gptq (default for --bits): the GPTQ layout transformers, GPTQModel, vLLM, ExLlamaV2 load; "
    "quantkit (default for --bpw / --rotate): our own, mixed bits.",
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
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan, the output size and peak memory; write nothing.")
@click.option("--force", is_flag=True, help="Replace a non-empty DST.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize(src: Path, dst: Path, bpw: float | None, rotate: bool, measurement: Path | None, measure_rows: int,
             bits: int, group_size: str, act_order: bool, static_groups: bool, sym: bool,
             damp: float, clip: bool, vision: str, head_bits: int | None, fmt: str | None, dataset: str | None,
             split: str,
             text_field: str, rows: int, seq_len: int, seed: int, work_dir: Path | None, offload_dir: Path | None,
             restart: bool, device: str,
             dtype: str | None, max_shard_size: str, dry_run: bool, force: bool, quiet: bool) -> None:  # fmt: skip
    """Quantize a converted model SRC with GPTQ, layer by layer, into DST (resumable: rerun after a crash)."""
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.pipeline import quantize as run_quantize

    try:
        gs = _group_size(group_size)
    except ValueError:
        raise QuantkitError(f"--group-size must be 32, 64, 128 or none, got {group_size}") from None
    settings = QuantSettings(bits=bits, group_size=gs, sym=sym, act_order=act_order, static_groups=static_groups,
                             damp=damp, clip=clip)  # fmt: skip
    fmt = fmt or ("quantkit" if bpw is not None or rotate else "gptq")
    plan = run_quantize(
        src, dst, settings=settings, fmt=fmt, head_bits=head_bits, bpw=bpw, rotate=rotate, measurement=measurement,
        measure_rows=measure_rows, vision=vision, dataset=dataset, split=split,
        text_field=text_field, rows=rows, seq_len=seq_len, seed=seed, work_dir=work_dir, offload_dir=offload_dir,
        restart=restart,
        force=force, dry_run=dry_run, device=device, dtype=dtype, max_shard_size=max_shard_size,
        progress=not quiet, log=click.echo,
    )  # fmt: skip
    if dry_run:
        click.echo(plan.summary())
