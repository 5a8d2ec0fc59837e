"""`quantkit tokenize`: the human-readable output, request-object input, relative image paths, and must-show 4:
bad input is one `error:` line with exit code 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tokenizer_cases import assistant, call, converted_folder, img, png_bytes, reference_encode, system, text, user

from quantkit.cli import main


def _run(*args):
    return CliRunner().invoke(main, ["tokenize", *map(str, args)])


def test_text_output_shows_prompt_count_and_images(tmp_path):
    messages = [system("Describe images."), user([text("What is this?"), img(300, 1100)])]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    result = _run(converted_folder("pixtral-large"), "--messages", tmp_path / "chat.json")
    assert result.exit_code == 0, result.output
    ref = reference_encode("pixtral-large", messages)
    rows, columns = ref.images[0].shape[1] // 16, ref.images[0].shape[2] // 16
    assert result.output.splitlines() == [
        "<s>[SYSTEM_PROMPT] Describe images.[/SYSTEM_PROMPT][INST][IMG] What is this?[/INST]",
        "",
        f"tokens: {len(ref.tokens)}",
        f"image 1: {columns * 16}x{rows * 16} px, {columns}x{rows} patches, {(columns + 1) * rows} tokens",
    ]


def test_request_object_and_relative_image_path(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png_bytes(70, 45))
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}]
    request = {"messages": [user([{"type": "image_url", "image_url": {"url": "pics/a.png"}}])]}
    (tmp_path / "request.json").write_text(json.dumps({**request, "tools": tools}))
    result = _run(converted_folder("pixtral-12b"), "--messages", tmp_path / "request.json", "--json")
    assert result.exit_code == 0, result.output
    absolute = [user([{"type": "image_url", "image_url": {"url": (tmp_path / "pics" / "a.png").as_uri()}}])]
    ref = reference_encode("pixtral-12b", absolute, tools)
    assert json.loads(result.output) == {"input_ids": ref.tokens, "images": [{"height": 48, "width": 80}]}


def _bad_inputs(tmp_path):
    folder = converted_folder("mistral-large-2407")
    (tmp_path / "broken.json").write_text('[{"role": "user", "content": "hi"')
    (tmp_path / "role.json").write_text(json.dumps([{"role": "robot", "content": "beep"}]))
    missing = [user([{"type": "image_url", "image_url": {"url": str(tmp_path / "nope.png")}}])]
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    (tmp_path / "notes.png").write_text("this is not an image\n")
    fake = [user([{"type": "image_url", "image_url": {"url": "notes.png"}}])]
    (tmp_path / "fake.json").write_text(json.dumps(fake))
    (tmp_path / "ok.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    (tmp_path / "empty-model").mkdir()
    bad_id = [user("x"), assistant(None, [call("12", "f", "{}")])]
    (tmp_path / "bad_id.json").write_text(json.dumps(bad_id))
    pixtral = converted_folder("pixtral-12b")
    return {
        "invalid JSON": ((folder, "--messages", tmp_path / "broken.json"), "invalid JSON"),
        "unknown role": ((folder, "--messages", tmp_path / "role.json"), "unknown role 'robot'"),
        "missing image": ((pixtral, "--messages", tmp_path / "missing.json"), "image file not found"),
        "not an image": ((pixtral, "--messages", tmp_path / "fake.json"), "not a readable image"),
        "no tokenizer": ((tmp_path / "empty-model", "--messages", tmp_path / "ok.json"), "no tokenizer in"),
        "no model folder": ((tmp_path / "absent", "--messages", tmp_path / "ok.json"), "model folder not found"),
        "no messages file": ((folder, "--messages", tmp_path / "absent.json"), "messages file not found"),
        "image on text model": ((folder, "--messages", tmp_path / "fake.json"), "takes no images"),
        "bad tool call id": ((folder, "--messages", tmp_path / "bad_id.json"), "9 letters or digits"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "invalid JSON",
        "unknown role",
        "missing image",
        "not an image",
        "no tokenizer",
        "no model folder",
        "no messages file",
        "image on text model",
        "bad tool call id",
    ],
)
def test_bad_input_is_one_error_line(case, tmp_path):
    args, message = _bad_inputs(tmp_path)[case]
    result = _run(*args)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
