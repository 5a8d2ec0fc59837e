"""`quantkit serve`: load a converted or quantized folder once, then answer OpenAI-style requests over HTTP.

Everything that can be checked before the (possibly minutes-long) load is: the folder, its tokenizer, that the
web extra is installed, that the port is free, the local media folder and the KV cache options. Startup prints the
model, where its parts went, the memory they take, the KV cache budget in tokens and the URL.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from quantkit.errors import QuantkitError
from quantkit.io.writer import parse_size
from quantkit.model.config import load_model_config
from quantkit.model.generate import BLOCK, KV_FRACTION, kv_token_bytes, warm_up
from quantkit.model.load import model_parts
from quantkit.model.text import Transformer
from quantkit.quantized_model import available_memory, load_any
from quantkit.tokenizer.chat import ChatTokenizer


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise QuantkitError(f"cannot listen on {host}:{port}: {e.strerror}") from None


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", timeout_s: float = 30) -> Iterator[str]:
    """Run app on uvicorn in a background thread on a free port of host; yields its URL, stops it on exit
    (for tests and benchmarks)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))  # the port is ours from here on: no race with other users of free ports
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise QuantkitError("the server did not start")
            time.sleep(0.05)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
        if thread.is_alive():
            raise QuantkitError("the server did not stop")


def bits_label(qcfg: dict) -> str:
    """`, 4-bit`, `, per-module 2/3/4-bit` (GPTQ `dynamic` overrides) or `, 3.0 bpw mixed` (quantkit format)."""
    rules = qcfg.get("dynamic") or {}
    widths = {o["bits"] for k, o in rules.items() if not k.startswith("-:") and "bits" in o}
    if widths and qcfg.get("bits"):
        return f", per-module {'/'.join(map(str, sorted(widths | {qcfg['bits']})))}-bit"
    if qcfg.get("bpw"):
        return f", {qcfg['bpw']} bpw mixed"
    return f", {qcfg['bits']}-bit" if qcfg.get("bits") else ""


def describe(model: Transformer, folder: Path, name: str) -> list[str]:
    """Startup lines: the model, the device of each group of parts, the bytes of weights on each device."""
    qcfg = model.config.quantization
    kind = f"{qcfg.get('quant_method')} quantized" if qcfg else f"{model.norm.weight.dtype}".replace("torch.", "")
    if qcfg:
        kind += bits_label(qcfg)
    t = model.config.text
    lines = [f"model: {name} ({folder}, {kind}, {t.n_layers} layers, context {t.max_seq_len}"
             + (", vision" if model.vision_tower is not None else "") + ")"]  # fmt: skip
    split: dict[str, list[str]] = {}
    for part in model_parts(model):
        tensor = next(iter(model.get_submodule(part).state_dict().values()))
        split.setdefault(str(tensor.device), []).append(part)
    for device, parts in split.items():
        layers = [p for p in parts if p.startswith("layers.")]
        others = [p for p in parts if not p.startswith("layers.")]
        span = f"layers {layers[0][7:]}-{layers[-1][7:]}" if layers else ""
        lines.append(f"device {device}: {', '.join([span] * bool(span) + others)}")
    used: Counter[str] = Counter()
    for tensor in [*model.parameters(), *model.buffers()]:
        used[str(tensor.device)] += tensor.numel() * tensor.element_size()
    memory = []
    for d, b in used.items():
        allocated = f", {torch.cuda.memory_allocated(d) / 1e9:.2f} GB allocated" if d.startswith("cuda") else ""
        memory.append(f"{b / 1e9:.2f} GB of weights on {d}{allocated}")
    lines.append("memory: " + "; ".join(memory))
    return lines


CPU_KV_FRACTION = 0.5  # default KV cache budget on the CPU: this share of the memory available after loading


def kv_share(memory: str | None) -> float | None:
    """--kv-cache-memory as a share of the available memory ("0.5"), or None when it is a size (or not given);
    a size that does not parse is an error here, before the model loads."""
    if memory is None:
        return None
    if re.fullmatch(r"\s*(0?\.\d+|1(\.0*)?)\s*", memory):
        return float(memory)
    parse_size(memory)
    return None


def kv_budget(model: Transformer, memory: str | None = None) -> tuple[int, int]:
    """(bytes, tokens) of the KV cache budget: `memory` as a size ("2GB", "512MiB") or a share of the memory
    available now on the model's devices ("0.5"); default: KV_FRACTION of free GPU memory, CPU_KV_FRACTION of
    the host's available memory. Tokens are whole cache blocks; the cache takes memory only as requests use it."""
    t = model.config.text
    per_token: dict[torch.device, int] = {}
    for layer in model.layers:
        w = layer.input_layernorm.weight
        per_token[w.device] = per_token.get(w.device, 0) + 2 * t.n_kv_heads * t.head_dim * w.element_size()
    fraction = kv_share(memory)
    if memory is None:
        fraction = KV_FRACTION if all(d.type == "cuda" for d in per_token) else CPU_KV_FRACTION
    if fraction is None:
        size = parse_size(memory)
        tokens = size // kv_token_bytes(model)
    else:
        tokens = min(int(available_memory(d) * fraction) // b for d, b in per_token.items())
        size = tokens * kv_token_bytes(model)
    tokens = tokens // BLOCK * BLOCK
    if tokens < BLOCK:
        raise QuantkitError(f"a KV cache budget of {size / 1e9:.3f} GB holds no {BLOCK}-token block of this model")
    return size, tokens


def context_limit(context: int, budget_tokens: int, max_model_len: int | None) -> int:
    """Prompt plus answer tokens a request may have: --max-model-len, else the model's context capped to the KV
    cache budget (one request must fit in it alone)."""
    if max_model_len is None:
        return min(context, budget_tokens)
    if max_model_len > context:
        raise QuantkitError(f"--max-model-len {max_model_len} is more than the model's context of {context} tokens")
    if max_model_len > budget_tokens:
        raise QuantkitError(f"--max-model-len {max_model_len} does not fit in the KV cache budget of {budget_tokens} "
                            "tokens: raise --kv-cache-memory or lower --max-model-len")  # fmt: skip
    return max_model_len


def serve(
    folder: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = 64,
    progress: bool = True,
    max_batch: int = 8,
    allowed_local_media_path: Path | None = None,
    max_model_len: int | None = None,
    kv_cache_memory: str | None = None,
    prefill_chunk: int = 512,
    prefix_cache: bool = True,
) -> None:
    """Load FOLDER and serve it until interrupted."""
    try:
        import uvicorn

        from quantkit.serve.app import create_app
        from quantkit.serve.engine import Engine
    except ImportError as e:
        # the install from the checkout: `quantkit` on PyPI is an unrelated project
        raise QuantkitError(f"quantkit serve needs the serve extra ({e.name} is missing): "
                            "pip install -e \".[serve]\" in the quantkit checkout") from None  # fmt: skip
    folder = Path(folder)
    media = None
    if allowed_local_media_path is not None:
        media = Path(allowed_local_media_path).resolve()
        if not media.is_dir():
            raise QuantkitError(f"--allowed-local-media-path {allowed_local_media_path} is not a folder")
    config = load_model_config(folder)
    if max_model_len is not None and max_model_len > config.text.max_seq_len:
        raise QuantkitError(f"--max-model-len {max_model_len} is more than the model's context of "
                            f"{config.text.max_seq_len} tokens")  # fmt: skip
    kv_share(kv_cache_memory)
    tokenizer = ChatTokenizer.from_folder(folder)
    _check_port(host, port)
    name = served_model_name or folder.resolve().name
    model = load_any(folder, device=device, dtype=dtype, backend=backend, progress=progress, config=config)
    if model.norm.weight.is_cuda:
        warm_up(model, tokenizer.bos_id)
    for line in describe(model, folder, name):
        click.echo(line, err=True)
    budget, tokens = kv_budget(model, kv_cache_memory)
    context = context_limit(config.text.max_seq_len, tokens, max_model_len)
    click.echo(f"KV cache: budget {budget / 1e9:.2f} GB = {tokens} tokens for all requests together (taken in "
               f"blocks of {BLOCK} as requests use them); max model len {context} (context {config.text.max_seq_len})"
               + ("" if prefix_cache else "; no prefix cache"), err=True)  # fmt: skip
    engine = Engine(model, tokenizer, max_queue, max_batch, tokens, prefill_chunk or None, prefix_cache)
    label = "the model's context" if context == config.text.max_seq_len else "the server's max model len"
    app = create_app(engine, name, context, api_key, media, label)
    log = logging.getLogger("quantkit.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     quantkit: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    click.echo((f"batch: up to {max_batch} requests decoded together" if max_batch > 1 else
                "batch: one request at a time") + (f"; prompts prefilled in chunks of up to {prefill_chunk} tokens "
               "between decode steps" if prefill_chunk else "; prompts prefilled whole"), err=True)  # fmt: skip
    click.echo(f"local images: files inside {media}" if media else "local images: none (data: URIs only)", err=True)
    click.echo(f"serving at http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: for a server that is the normal stop
        click.echo("stopped", err=True)
    finally:
        engine.close()
