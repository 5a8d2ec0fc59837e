"""The real `quantkit serve` app on uvicorn in a background thread, on a free port of 127.0.0.1, for tests."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from quantkit.model.config import load_model_config
from quantkit.quantized_model import load_any
from quantkit.serve.app import create_app
from quantkit.serve.engine import Engine
from quantkit.serve.server import context_limit, kv_budget, serve_in_thread
from quantkit.tokenizer.chat import ChatTokenizer


@contextmanager
def running_server(folder: Path, name: str = "tiny", api_key: str | None = None, max_queue: int = 64,
                   max_batch: int = 8, media: Path | None = None, kv_cache_memory: str | None = None,
                   prefill_chunk: int | None = 512):  # fmt: skip
    """Yields (base_url, engine); the server and its worker are stopped on exit. The KV budget and the context
    limit are set as `quantkit serve` sets them."""
    tokenizer = ChatTokenizer.from_folder(folder)
    model = load_any(folder, device="cpu", backend="torch", progress=False)
    _, tokens = kv_budget(model, kv_cache_memory)
    context = load_model_config(folder).text.max_seq_len
    limit = context_limit(context, tokens, None)
    engine = Engine(model, tokenizer, max_queue, max_batch, tokens, prefill_chunk)
    label = "the model's context" if limit == context else "the server's max model len"
    app = create_app(engine, name, limit, api_key, media, label)
    try:
        with serve_in_thread(app) as url:
            yield url, engine
    finally:
        engine.close()


def health(url: str) -> dict:
    response = httpx.get(f"{url}/health", timeout=10)
    response.raise_for_status()
    return response.json()


def wait_for(url: str, predicate, timeout_s: float = 30) -> dict:
    """Poll /health until predicate(status) holds (bounded in time); returns the last status."""
    deadline = time.monotonic() + timeout_s
    status = health(url)
    while not predicate(status) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = health(url)
    return status
