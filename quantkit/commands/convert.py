"""`quantkit convert`: click options and printing around quantkit.convert.pipeline.convert."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
