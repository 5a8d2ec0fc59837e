"""write_tokenizer_files on the four real tokenizer files: what transformers loads from it encodes, decodes and
numbers special tokens exactly like mistral-common; vocabulary sizes match params.json; processor configs."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizer_cases import DATA, MULTIMODAL, TOKENIZERS, converted_folder, hf_tokenizer, native_folder, ours, reference

from quantkit.errors import QuantkitError
from quantkit.tokenizer.chat import ChatTokenizer
from quantkit.tokenizer.hf import write_tokenizer_files
from quantkit.tokenizer.source import check_against_params, find_tokenizer_file, read_tokenizer_info

# params.json vocab_size of the models these tokenizers belong to (conversion spec, section 1.1)
PARAMS_VOCAB = {"pixtral-12b": 131072, "pixtral-large": 32768, "mistral-large-2407": 32768, "mixtral": 32000}

# plain text as mistral-common's raw tokenizer encodes it (texts that do not start with whitespace: see
# test_leading_whitespace_is_exact_in_chats for why)
TEXTS = [
    "Hello world",
    "Ça va ? Très bien, merci. Größe, straße, ¿qué tal?",
    "你好，世界！日本語のテキストです。한국어 텍스트. Привет, мир!",
    "def f(x):\n    return x ** 2\n\n\n\tindent",
    "Numbers 1234567890 and 3.14159, 1e-10",
    "trailing spaces   ",
    "multiple   inner    spaces\n\n\nand newlines\r\n",
    "emoji 🤖🚀🦀 and rare ⅋ ꙮ 𓀀 symbols",
    "x[REF]y [/REF] [REFERENCE_DOC_7]",
    "a" * 200,
]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_files_written(name):
    out = converted_folder(name)
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
    if name in MULTIMODAL:
        expected |= {"preprocessor_config.json", "processor_config.json"}
    native = TOKENIZERS[name][1]
    assert {p.name for p in out.iterdir()} == expected | {native}
    assert (out / native).read_bytes() == (DATA / TOKENIZERS[name][0]).read_bytes()
    assert find_tokenizer_file(out) == out / native
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (out / "chat_template.jinja").read_text()
    assert hf_tokenizer(name).chat_template == config["chat_template"]


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_vocab_size_matches_params_and_reference(name):
    ref = reference(name).instruct_tokenizer.tokenizer
    info = read_tokenizer_info(find_tokenizer_file(native_folder(name)))
    assert info.vocab_size == ref.n_words == PARAMS_VOCAB[name]
    assert len(hf_tokenizer(name)) == PARAMS_VOCAB[name]
    assert ours(name).vocab_size == PARAMS_VOCAB[name]
    check_against_params(info, {"vocab_size": PARAMS_VOCAB[name]})


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_special_token_ids_come_from_the_tokenizer(name):
    ref = reference(name).instruct_tokenizer.tokenizer
    tok = hf_tokenizer(name)
    special_ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert special_ids == set(ref.special_ids) | {ref.unk_id}
    for token_id in ref.special_ids:
        piece = ref.id_to_piece(token_id)
        assert tok.convert_tokens_to_ids(piece) == token_id == ref.get_special_token(piece)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_id, ref.eos_id) == (ours(name).bos_id, ours(name).eos_id)
    encoder = reference(name).instruct_tokenizer.image_encoder
    expected = None if encoder is None else encoder.special_ids
    got = ours(name)
    if expected is None:
        assert (got.image_token_id, got.image_break_id, got.image_end_id) == (None, None, None)
    else:
        assert (got.image_token_id, got.image_break_id, got.image_end_id) == (
            expected.img,
            expected.img_break,
            expected.img_end,
        )


def test_image_break_ids_differ_between_pixtral_tokenizers():
    assert (ours("pixtral-12b").image_break_id, ours("pixtral-12b").image_end_id) == (12, 13)
    assert (ours("pixtral-large").image_break_id, ours("pixtral-large").image_end_id) == (14, 15)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_plain_text_encode_and_decode_match_mistral_common(name):
    ref = reference(name).instruct_tokenizer.tokenizer
    tok = hf_tokenizer(name)
    spm = name != "pixtral-12b"
    for text in TEXTS:
        ids = ref.encode(text, bos=False, eos=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tok(text)["input_ids"] == ref.encode(text, bos=spm, eos=False), text
        assert ours(name).encode_text(text) == ids
        with_specials = [ref.bos_id, *ids, ref.eos_id]
        assert tok.decode(with_specials, skip_special_tokens=True) == ref.decode(with_specials) == text
        assert ours(name).decode(with_specials) == text


@pytest.mark.parametrize("name", ["pixtral-large", "mixtral"])
def test_leading_whitespace_is_exact_in_chats(name):
    """A HF Metaspace only adds the dummy prefix when text does not already start with a space, so plain
    `tok(" x")` loses one "▁" (the same holds for transformers' own Llama conversions). Inside a chat every
    text chunk follows a special token and the template writes the prefix itself, so ids stay exact."""
    from tokenizer_cases import reference_encode

    messages = [{"role": "user", "content": "  two leading spaces"}]
    expected = reference_encode(name, messages).tokens
    assert hf_tokenizer(name).apply_chat_template(messages, tokenize=True, return_dict=False) == expected


def test_mismatched_tokenizer_is_a_clear_error():
    pixtral_12b = read_tokenizer_info(find_tokenizer_file(native_folder("pixtral-12b")))
    pixtral_large = read_tokenizer_info(find_tokenizer_file(native_folder("pixtral-large")))
    large_params = {"vocab_size": 32768, "vision_encoder": {"image_token_id": 10, "image_break_token_id": 14}}
    with pytest.raises(QuantkitError, match="131072 tokens but params.json says vocab_size=32768"):
        check_against_params(pixtral_12b, large_params)
    check_against_params(pixtral_large, large_params)
    with pytest.raises(QuantkitError, match=r"image_break_token_id=12 but .* has \[IMG_BREAK\]=14"):
        check_against_params(pixtral_large, {"vocab_size": 32768, "vision_encoder": {"image_break_token_id": 12}})
    mistral_large = read_tokenizer_info(find_tokenizer_file(native_folder("mistral-large-2407")))
    with pytest.raises(QuantkitError, match="no image support"):
        check_against_params(mistral_large, large_params)


def test_processor_configs_load_in_transformers():
    from transformers import AutoImageProcessor

    for name in sorted(MULTIMODAL):
        out = converted_folder(name)
        processor = json.loads((out / "processor_config.json").read_text())
        assert processor["image_token"] == "[IMG]" and processor["patch_size"] == 16
        assert (processor["image_break_token"], processor["image_end_token"]) == ("[IMG_BREAK]", "[IMG_END]")
        image_processor = AutoImageProcessor.from_pretrained(out)
        assert type(image_processor).__name__.startswith("PixtralImageProcessor")
        assert image_processor.size["longest_edge"] == 1024
        assert image_processor.patch_size["height"] == image_processor.patch_size["width"] == 16
        assert image_processor.resample == 3 and image_processor.do_convert_rgb


def test_unsupported_tokenizer_version(tmp_path):
    shutil.copyfile(DATA / "mistral_instruct_tokenizer_240216.model.v2", tmp_path / "tokenizer.model.v2")
    info = read_tokenizer_info(tmp_path / "tokenizer.model.v2")
    with pytest.raises(QuantkitError, match="version v2 is not supported"):
        write_tokenizer_files(info, tmp_path / "out")
    with pytest.raises(QuantkitError, match="v2 is not supported"):
        ChatTokenizer.from_folder(tmp_path)
