"""`quantkit run`: click options around quantkit.commands.chat (one answer, or a chat on stdin)."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.errors import QuantkitError


@click.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", help="Answer this prompt and exit. Without it: an interactive chat on stdin.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable).")
@click.option("--system", help="System prompt.")
@click.option(
    "--raw",
    is_flag=True,
    help="Continue --prompt as plain text: no chat template (BOS as the model's tokenizer adds it); for base models.",
)
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
@click.option(
    "--keep-dequantized/--no-keep-dequantized",
    default=True,
    show_default=True,
    help="torch backend: keep each linear's dequantized weight in memory while it fits (fast CPU decoding).",
)
@click.option(
    "--graph/--no-graph",
    default=True,
    show_default=True,
    help="On one CUDA GPU, decode with the step captured as a CUDA graph (--no-graph: eager, to compare).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per answer (ids, text, tokens/s).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run_command(
    model: Path,
    prompt: str | None,
    images: tuple[Path, ...],
    system: str | None,
    raw: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    device: str,
    dtype: str,
    backend: str,
    keep_dequantized: bool,
    graph: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Chat with a converted or quantized model folder MODEL (Mistral, Mixtral, or Pixtral with images)."""
    from functools import partial

    from quantkit.commands.chat import run
    from quantkit.model.generate import Sampling
    from quantkit.quantized_model import load_any

    if raw and (prompt is None or images or system is not None):
        raise QuantkitError("--raw continues a --prompt as plain text: it needs --prompt and takes no --image/--system")
    if max_new_tokens < 1:
        raise QuantkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed, graph)
    load = partial(load_any, backend=backend, keep_dense=keep_dequantized)
    run(model, prompt, list(images), system, sampling, device, dtype, as_json, progress=not quiet, load=load, raw=raw)
