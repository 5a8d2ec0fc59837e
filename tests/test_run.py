"""`quantkit run` end to end on tiny converted models, checked against transformers' greedy generate."""

from __future__ import annotations

import json
import shutil

import torch
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.tokenizer.chat import ChatTokenizer

PROMPT = "What is in this image?"


def invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["run", *map(str, args), "--device", "cpu", "--quiet"], input=stdin)


def test_run_pixtral_with_image_matches_transformers(tiny_models, scene_image):
    m = tiny_models.get("pixtral_12b")
    result = invoke(m["hf"], "--prompt", PROMPT, "--image", scene_image, "--max-new-tokens", "12", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    tokenizer = ChatTokenizer.from_folder(m["hf"])
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": str(scene_image)}]
    encoded = tokenizer.encode_chat([{"role": "user", "content": content}])
    assert report["input_ids"] == encoded.input_ids
    (pixels,) = encoded.images
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        expected = m["reference"].generate(
            input_ids=ids,
            pixel_values=pixels[None],
            image_sizes=torch.tensor([pixels.shape[1:]]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_id,
        )[0, ids.shape[1] :]
    assert report["output_ids"] == expected.tolist()
    assert report["text"] == tokenizer.decode([t for t in expected.tolist() if t != tokenizer.eos_id])
    assert report["prefill_tokens_per_s"] > 0


def test_run_prints_streamed_answer_and_speeds(tiny_models, scene_image):
    m = tiny_models.get("pixtral_12b")
    result = invoke(m["hf"], "--prompt", PROMPT, "--image", scene_image, "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    as_json = invoke(m["hf"], "--prompt", PROMPT, "--image", scene_image, "--max-new-tokens", "6", "--json")
    assert result.stdout.strip() == json.loads(as_json.stdout)["text"].strip() != ""
    assert "prefill" in result.stderr and "tok/s" in result.stderr


def test_interactive_chat_answers_each_turn(tiny_models):
    m = tiny_models.get("mistral_large")
    result = invoke(m["hf"], "--max-new-tokens", "4", "--json", stdin="Hello there\nAnd a second question?\n/exit\n")
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))
    assert len(second["input_ids"]) > len(first["input_ids"])  # the second turn carries the first exchange
    assert second["input_ids"][: len(first["input_ids"])] == first["input_ids"]


def one_line_error(result, expected: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_missing_image_is_one_line_error(tiny_models, tmp_path):
    result = invoke(tiny_models.get("pixtral_12b")["hf"], "--prompt", "hi", "--image", tmp_path / "no.png")
    one_line_error(result, "image file not found")


def test_folder_without_config_is_one_line_error(tmp_path):
    one_line_error(invoke(tmp_path, "--prompt", "hi"), "has no config.json")


def test_image_for_text_only_model_is_one_line_error(tiny_models, scene_image):
    result = invoke(tiny_models.get("mistral_large")["hf"], "--prompt", "hi", "--image", scene_image)
    one_line_error(result, "text-only model")


def test_prompt_longer_than_context_is_one_line_error(tiny_models, tmp_path):
    folder = tmp_path / "short"
    shutil.copytree(tiny_models.get("pixtral_12b")["hf"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(invoke(folder, "--prompt", "word " * 50), "longer than the model's context")
