"""`quantkit tokenize`: show exactly what a model would be prompted with (the runtime's own code path)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.errors import QuantkitError
from quantkit.tokenizer.chat import ChatTokenizer


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--messages", "messages_file", required=True, type=click.Path(path_type=Path), help="OpenAI chat JSON.")
@click.option("--tools", "tools_file", type=click.Path(path_type=Path), help="OpenAI function tools JSON.")
@click.option("--json", "as_json", is_flag=True, help='Print {"input_ids": [...], "images": [{"height", "width"}]}.')
def tokenize(model: Path, messages_file: Path, tools_file: Path | None, as_json: bool) -> None:
    """Show the prompt a model folder MODEL builds from a chat (special tokens visible) and its token count."""
    click.echo(tokenize_report(model, messages_file, tools_file, as_json))


def read_json(path: Path, what: str) -> object:
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise QuantkitError(f"{path}: JSON nested too deeply to be a chat") from None


def tokenize_report(model: Path, messages_file: Path, tools_file: Path | None, as_json: bool) -> str:
    """The rendered prompt and token count, or `{"input_ids": [...], "images": [{"height", "width"}]}`.

    The messages file holds a list of OpenAI chat messages, or a request object with "messages" (and
    optionally "tools"); relative image paths are resolved against the messages file's folder.
    """
    tokenizer = ChatTokenizer.from_folder(model)
    data = read_json(messages_file, "messages")
    tools = read_json(tools_file, "tools") if tools_file else None
    if isinstance(data, dict) and "messages" in data:
        tools = tools if tools is not None else data.get("tools")
        data = data["messages"]
    encoded = tokenizer.encode_chat(data, tools, base_dir=Path(messages_file).parent)
    sizes = [{"height": int(img.shape[1]), "width": int(img.shape[2])} for img in encoded.images]
    if as_json:
        return json.dumps({"input_ids": encoded.input_ids, "images": sizes})
    lines = [encoded.text, "", f"tokens: {len(encoded.input_ids)}"]
    patch = tokenizer.info.patch_size * tokenizer.info.spatial_merge_size
    for i, size in enumerate(sizes, 1):
        columns, rows = size["width"] // patch, size["height"] // patch
        tokens = (columns + 1) * rows
        lines.append(f"image {i}: {size['width']}x{size['height']} px, {columns}x{rows} patches, {tokens} tokens")
    return "\n".join(lines)
