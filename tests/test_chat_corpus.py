"""Must-show 1: for every conversation of the corpus and each of the four real tokenizers, the ids from
(a) transformers' AutoTokenizer + our chat template and (b) our ChatTokenizer / `quantkit tokenize` equal
mistral-common's encode_chat_completion, and our pixels equal mistral-common's within 1e-2 mean abs diff."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizer_cases import TOKENIZERS, cases_for, converted_folder, hf_tokenizer, ours, reference_case

from quantkit.cli import main

ALL = [(name, case) for name in TOKENIZERS for case in cases_for(name)]
IDS = [f"{name}-{case.id}" for name, case in ALL]


def _expand_images(prompt: str, images: list[np.ndarray], patch: int = 16) -> str:
    """What the HF PixtralProcessor does by string: each [IMG] becomes the image's token grid."""
    pieces = prompt.split("[IMG]")
    assert len(pieces) == len(images) + 1
    out = pieces[0]
    for image, rest in zip(images, pieces[1:], strict=True):
        rows, columns = image.shape[1] // patch, image.shape[2] // patch
        grid = ("[IMG]" * columns + "[IMG_BREAK]") * rows
        out += grid[: -len("[IMG_BREAK]")] + "[IMG_END]" + rest
    return out


def test_corpus_size():
    for name in TOKENIZERS:
        cases = cases_for(name)
        assert len(cases) >= 30, name
        assert len({c.id for c in cases}) == len(cases)


@pytest.mark.parametrize(("name", "case"), ALL, ids=IDS)
def test_chat_tokenizer_matches_mistral_common(name, case):
    ref = reference_case(name, case)
    encoded = ours(name).encode_chat(case.messages, case.tools)
    assert encoded.input_ids == ref.tokens
    assert len(encoded.images) == len(ref.images) == case.images
    for pixels, expected in zip(encoded.images, ref.images, strict=True):
        assert pixels.dtype.is_floating_point and tuple(pixels.shape) == expected.shape
        assert np.abs(pixels.numpy() - expected).mean() < 1e-2


@pytest.mark.parametrize(
    ("name", "case"), [(n, c) for n, c in ALL if c.hf], ids=[i for i, (_, c) in zip(IDS, ALL, strict=True) if c.hf]
)
def test_hf_template_matches_mistral_common(name, case):
    ref = reference_case(name, case)
    tok = hf_tokenizer(name)
    prompt = tok.apply_chat_template(case.messages, tools=case.tools, tokenize=False)
    assert prompt == ours(name).encode_chat(case.messages, case.tools).text
    if case.images:
        ids = tok(_expand_images(prompt, ref.images), add_special_tokens=False)["input_ids"]
    else:
        ids = tok.apply_chat_template(case.messages, tools=case.tools, tokenize=True, return_dict=False)
    assert ids == ref.tokens


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_tokenize_command_matches_mistral_common(name, tmp_path):
    runner = CliRunner()
    for case in cases_for(name):
        messages = tmp_path / f"{case.id}.json"
        messages.write_text(json.dumps(case.messages))
        args = ["tokenize", str(converted_folder(name)), "--messages", str(messages), "--json"]
        if case.tools:
            (tmp_path / "tools.json").write_text(json.dumps(case.tools))
            args += ["--tools", str(tmp_path / "tools.json")]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (case.id, result.output)
        out = json.loads(result.output)
        ref = reference_case(name, case)
        assert out["input_ids"] == ref.tokens, case.id
        assert out["images"] == [{"height": i.shape[1], "width": i.shape[2]} for i in ref.images], case.id
