"""`quantkit inspect`: click options and printing around quantkit.inspect."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--card", is_flag=True, help="A model-card table (markdown) for a quantized folder.")
def inspect(path: Path, as_json: bool, card: bool) -> None:
    """Describe a native, HF or quantized model folder: format, architecture, parameters, dtype, size."""
    from quantkit.inspect import allocation_rows, card_rows, describe, format_card, format_report

    report = describe(path)
    if card and as_json:
        data = dict(card_rows(report, path))
        if layers := allocation_rows(report):
            keys = ("layer", "bpw", "predicted_kl_attn", "predicted_kl_mlp", "share")
            data["Allocation"] = [dict(zip(keys, row, strict=True)) for row in layers]
        click.echo(json.dumps(data, indent=2))
    elif card:
        click.echo(format_card(report, path))
    else:
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
