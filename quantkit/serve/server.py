"""`quantkit serve`: load a converted or quantized folder once, then answer OpenAI-style requests over HTTP.

Everything that can be checked before the (possibly minutes-long) load is: the folder, its tokenizer, that the
web extra is installed and that the port is free. Startup prints the model, where its parts went, the memory they
take and the URL.
"""

from __future__ import annotations

import logging
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
from quantkit.model.config import load_model_config
from quantkit.model.generate import warm_up
from quantkit.model.load import model_parts
from quantkit.model.text import Transformer
from quantkit.runtime import load_any, quantization_config
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
    qcfg = quantization_config(folder)
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
    config = load_model_config(folder)
    tokenizer = ChatTokenizer.from_folder(folder)
    _check_port(host, port)
    name = served_model_name or folder.resolve().name
    model = load_any(folder, device=device, dtype=dtype, backend=backend, progress=progress)
    if model.norm.weight.is_cuda:
        warm_up(model, tokenizer.bos_id)
    for line in describe(model, folder, name):
        click.echo(line, err=True)
    engine = Engine(model, tokenizer, max_queue, max_batch)
    app = create_app(engine, name, config.text.max_seq_len, api_key)
    log = logging.getLogger("quantkit.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     quantkit: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    click.echo(f"batch: up to {max_batch} requests decoded together" if max_batch > 1 else
               "batch: one request at a time", err=True)  # fmt: skip
    click.echo(f"serving at http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: for a server that is the normal stop
        click.echo("stopped", err=True)
    finally:
        engine.close()
