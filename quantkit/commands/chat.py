"""`quantkit run`'s terminal side: one answer to --prompt, or an interactive multi-turn chat, with images for Pixtral.

Inputs are checked before the model is loaded (config.json, image files, vision support), so mistakes cost no
loading time. Prompts go through the tokenizer's chat template and image preprocessing (quantkit.tokenizer);
answers stream to stdout as they are produced, and speed figures go to stderr so stdout stays the answer. On a GPU
the decode speed is also given as a fraction of the roofline (quantkit.model.roofline). The loader is a parameter
so that quantized folders load through quantkit.quantized_model without this package importing quantization code.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from quantkit.errors import QuantkitError
from quantkit.model.config import load_model_config
from quantkit.model.generate import Generation, Sampling, generate, stop_note, warm_up
from quantkit.model.load import load_model
from quantkit.model.roofline import BANDWIDTH_ENV, roofline_report
from quantkit.model.text import Transformer

if TYPE_CHECKING:
    from quantkit.tokenizer.chat import ChatTokenizer, Encoded

Loader = Callable[..., Transformer]  # load(folder, device=..., dtype=..., progress=...) -> model
HELP = (
    "commands: /image PATH (attach to your next message), /reset (new conversation), /help, /exit; "
    "Ctrl-C stops an answer"
)
COMMANDS = ("/image", "/reset", "/help", "/exit", "/quit")


class TextStream:
    """Prints an answer as tokens arrive; decodes the whole answer each time so multi-byte characters that
    span tokens are printed only once complete."""

    def __init__(self, tokenizer: ChatTokenizer, stop_ids: set[int], echo: bool):
        self.tokenizer, self.stop_ids, self.echo = tokenizer, stop_ids, echo
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, token: int) -> None:
        if token in self.stop_ids:
            return
        self.ids.append(token)
        if not self.echo:
            return
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            click.echo(text[len(self.printed) :], nl=False)
            sys.stdout.flush()
            self.printed = text

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def user_message(text: str, images: list[Path]) -> dict:
    """An OpenAI-format user message: text, then images as image_url parts (paths)."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "text", "text": text}] if text else []
    return {"role": "user", "content": parts + [{"type": "image_url", "image_url": str(p)} for p in images]}


def check_images(paths: list[Path], has_vision: bool, folder: Path) -> list[Path]:
    for p in paths:
        if not Path(p).is_file():
            raise QuantkitError(f"image file not found: {p}")
    if paths and not has_vision:
        raise QuantkitError(f"{folder.name} is a text-only model: it takes no --image")
    return [Path(p) for p in paths]


def answer(model: Transformer, tokenizer: ChatTokenizer, encoded: Encoded, sampling: Sampling, as_json: bool) -> str:
    """Stream one answer to an encoded conversation, print speeds (or one JSON object); returns the answer text."""
    stream = TextStream(tokenizer, tokenizer.stop_ids, echo=not as_json)
    result: Generation = generate(
        model,
        encoded.input_ids,
        encoded.images or None,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop_ids=sorted(tokenizer.stop_ids),
        on_token=stream,
        decode="auto" if sampling.graph else "eager",
    )
    roofline = roofline_report(model, result)
    if as_json:
        report = {
            "input_ids": result.input_ids,
            "output_ids": result.output_ids,
            "text": stream.text,
            "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            **roofline,
        }
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        click.echo(stream.text[len(stream.printed) :])
        n_in, n_out = len(result.input_ids), len(result.output_ids)
        note = stop_note(model, result, sampling, tokenizer.stop_ids)
        speed = f"{result.decode_tokens_per_s:.1f} tok/s"
        if roofline:
            gb = roofline["weight_bytes_per_token"] / 1e9
            speed += (
                f" = {roofline['roofline_fraction']:.0%} of the roofline "
                f"({roofline['roofline_tokens_per_s']:.1f} tok/s for {gb:.2f} GB of weights per token)"
            )
        elif model.norm.weight.is_cuda:
            speed += f" (roofline unknown: set {BANDWIDTH_ENV} to the GPU's bytes/s)"
        prefill = f"prefill {n_in} tokens at {result.prefill_tokens_per_s:.1f} tok/s"
        click.echo(f"[{prefill}, decode {n_out} tokens at {speed}{note}]", err=True)
    return stream.text


def read_line() -> str | None:
    """The next user line, None at end of input; the "> " prompt only on a terminal, so piped stdout stays clean."""
    if sys.stdin.isatty():
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line or None


def chat(
    model: Transformer,
    tokenizer: ChatTokenizer,
    folder: Path,
    system: str | None,
    images: list[Path],
    sampling: Sampling,
    as_json: bool,
) -> None:
    """Multi-turn chat on stdin until /exit or end of input; the whole conversation is re-encoded each turn."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    pending = list(images)
    click.echo(HELP, err=True)
    while True:
        line = read_line()
        if line is None:
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        command = text.split(maxsplit=1)[0] if text.startswith("/") else None
        if command is not None and command not in COMMANDS:
            click.echo(f"error: unknown command {command} (/help lists them; the model was not asked)", err=True)
            continue
        if command == "/help":
            click.echo(HELP, err=True)
            continue
        if command == "/reset":
            history, pending = history[:1] if system else [], []
            click.echo("conversation cleared" + (" (the system prompt stays)" if system else ""), err=True)
            continue
        if command == "/image":
            path = Path(text[len("/image") :].strip())
            try:
                pending += check_images([path], model.vision_tower is not None, folder)
                click.echo(f"attached {path} to your next message ({len(pending)} image(s) waiting)", err=True)
            except QuantkitError as e:
                click.echo(f"error: {e}", err=True)
            continue
        if not text and not pending:
            continue
        messages = [*history, user_message(text, pending)]
        try:
            reply = answer(model, tokenizer, tokenizer.encode_chat(messages), sampling, as_json)
        except QuantkitError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            click.echo(f"error: {e}", err=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the turn is dropped and the chat goes on
            click.echo("\n[answer stopped; the turn is not kept. /exit or Ctrl-D ends the chat]", err=True)
            continue
        history = [*messages, {"role": "assistant", "content": reply}]
        pending = []


def run(
    folder: Path,
    prompt: str | None,
    images: list[Path],
    system: str | None,
    sampling: Sampling,
    device: str = "auto",
    dtype: str = "auto",
    as_json: bool = False,
    progress: bool = True,
    load: Loader = load_model,
    raw: bool = False,
) -> None:
    """Load FOLDER (a converted model with its tokenizer) with `load` and answer --prompt, or chat without one.
    `raw`: the prompt is plain text for the model to continue (no chat template), as /v1/completions takes it."""
    from quantkit.tokenizer.chat import ChatTokenizer, Encoded

    folder = Path(folder)
    config = load_model_config(folder)
    images = check_images(images, config.vision is not None, folder)
    tokenizer = ChatTokenizer.from_folder(folder)
    encoded = None
    if prompt is not None:  # encoded and checked before loading: a 124B model takes minutes to load
        if raw:
            encoded = Encoded(tokenizer.encode_raw(prompt), [], prompt)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            encoded = tokenizer.encode_chat([*messages, user_message(prompt, images)])
        n, context = len(encoded.input_ids), config.text.max_seq_len
        if n > context:
            raise QuantkitError(f"the prompt is {n} tokens, longer than the model's context of {context} tokens")
    model = load(folder, device=device, dtype=dtype, progress=progress)
    if model.norm.weight.is_cuda:
        lengths = (1, min(len(encoded.input_ids) if encoded else 64, 512, config.text.max_seq_len))
        warm_up(model, tokenizer.bos_id, lengths)
    if encoded is None:
        chat(model, tokenizer, folder, system, images, sampling, as_json)
    else:
        answer(model, tokenizer, encoded, sampling, as_json)
