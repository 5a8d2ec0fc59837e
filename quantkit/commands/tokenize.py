"""`quantkit tokenize`: click options around quantkit.tokenizer.command."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--messages", "messages_file", required=True, type=click.Path(path_type=Path), help="OpenAI chat JSON.")
@click.option("--tools", "tools_file", type=click.Path(path_type=Path), help="OpenAI function tools JSON.")
@click.option("--json", "as_json", is_flag=True, help='Print {"input_ids": [...], "images": [{"height", "width"}]}.')
def tokenize(model: Path, messages_file: Path, tools_file: Path | None, as_json: bool) -> None:
    """Show the prompt a model folder MODEL builds from a chat (special tokens visible) and its token count."""
    from quantkit.tokenizer.command import tokenize_report

    click.echo(tokenize_report(model, messages_file, tools_file, as_json))
