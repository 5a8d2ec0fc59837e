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
def inspect(path: Path, as_json: bool) -> None:
    """Describe a native, HF or quantized model folder: format, architecture, parameters, dtype, size."""
    from quantkit.inspect import describe, format_report

    report = describe(path)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
