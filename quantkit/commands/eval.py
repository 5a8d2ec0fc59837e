"""`quantkit eval`: click options, the printed table and --save around quantkit.evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from quantkit.errors import QuantkitError
from quantkit.metrics import EvalResult


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
    from quantkit.evaluation import EvalSettings, run_eval

    save_path = check_save(model) if save and Path(model).is_dir() else None
    settings = EvalSettings(dataset, split, text_field, rows, seq_len, seed, device, dtype, backend)
    result = run_eval(model, reference, settings, progress=not quiet)
    click.echo(json.dumps(result.as_dict()) if as_json else format_table(result, model, reference, settings))
    if save_path is not None:
        figures = {**result.as_dict(), "dataset": dataset or "bundled mix", "rows": rows, "seq_len": seq_len,
                   "reference": str(reference) if reference else None}  # fmt: skip
        save_figures(save_path, figures)


def check_save(folder: Path) -> Path:
    """Where --save writes, checked before the (long) evaluation: a real write probe, since permission bits lie
    for root and on read-only mounts."""
    path = Path(folder) / "eval.json"
    probe = Path(folder) / f".eval.json.probe-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise QuantkitError(f"--save cannot write {path} ({e.strerror}); evaluate without --save") from None
    return path


def save_figures(path: Path, figures: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(tmp, path)


def format_table(result: EvalResult, model_dir: Path, reference_dir: Path | None, s) -> str:
    """A small two-column table of the figures."""
    rows = [
        ("model", str(model_dir)),
        ("rows", f"{s.rows} x {s.seq_len} tokens, seed {s.seed}, {s.dataset or 'bundled mix'}"),
        ("predicted tokens", str(result.tokens)),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("mean NLL", f"{result.nll:.4f} nats"),
    ]
    if reference_dir is not None:
        rows += [
            ("reference", str(reference_dir)),
            ("reference perplexity", f"{result.reference_perplexity:.4f}"),
            ("KL divergence", f"{result.kl_divergence:.6f} nats/token"),
            ("top-1 agreement", f"{result.top1_agreement:.2%}"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
