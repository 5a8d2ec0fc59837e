"""`quantkit serve`: click options around quantkit.serve.server."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, a list, or auto.")
@click.option(
    "--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True
)
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True)
@click.option("--api-key", envvar="QUANTKIT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--served-model-name", help="The model id clients use (default: the folder name).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1), help="Waiting requests.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Requests decoded together (continuous batching); 1: one request at a time.")
@click.option("--max-model-len", type=click.IntRange(min=1),
              help="Most prompt + answer tokens of a request (default: the model's context, capped to the KV budget).")
@click.option("--kv-cache-memory", metavar="SIZE|SHARE",
              help="KV cache budget for all requests together: a size (2GB, 512MiB) or a share of the memory "
                   "available after loading (0.5) [default: 0.9 of free GPU memory; 0.5 of available RAM on CPU].")
@click.option("--prefill-chunk", default=512, show_default=True, type=click.IntRange(min=0),
              help="Most prompt tokens prefilled between two decode steps (0: a prompt is prefilled whole).")
@click.option("--no-prefix-cache", is_flag=True, help="Do not reuse the KV cache of earlier prompts' leading tokens.")
@click.option("--allowed-local-media-path", type=click.Path(path_type=Path, file_okay=False),
              help="Folder whose image files requests may name by path or file:// URI (default: none: data: URIs).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def serve_command(model: Path, host: str, port: int, device: str, dtype: str, backend: str, api_key: str | None,
                  served_model_name: str | None, max_queue: int, max_batch: int, max_model_len: int | None,
                  kv_cache_memory: str | None, prefill_chunk: int, no_prefix_cache: bool,
                  allowed_local_media_path: Path | None, quiet: bool) -> None:  # fmt: skip
    """Serve a converted or quantized model folder MODEL over an OpenAI-compatible HTTP API (text and images)."""
    from quantkit.serve.server import serve

    serve(model, host, port, device, dtype, backend, api_key, served_model_name, max_queue, progress=not quiet,
          max_batch=max_batch, allowed_local_media_path=allowed_local_media_path, max_model_len=max_model_len,
          kv_cache_memory=kv_cache_memory, prefill_chunk=prefill_chunk,
          prefix_cache=not no_prefix_cache)  # fmt: skip
