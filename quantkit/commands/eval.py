"""`quantkit eval`: click options, printing and --save around quantkit.eval_command."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
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
