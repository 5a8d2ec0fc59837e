"""Must-show 2: the v7 (Pixtral-Large) template's extensions render as the issue describes, in both the HF
template and our ChatTokenizer; ids are checked against mistral-common's own tokenizer, piece by piece."""

from __future__ import annotations

import json

import pytest
from tokenizer_cases import (
    WEATHER,
    assistant,
    call,
    file_uri,
    hf_tokenizer,
    image_file,
    img,
    ours,
    reference,
    reference_encode,
    system,
    text,
    tool,
    user,
)

from quantkit.errors import QuantkitError

NAME = "pixtral-large"


def _render(messages, tools=None) -> str:
    """The HF template's string, after checking our ChatTokenizer shows the very same prompt."""
    prompt = hf_tokenizer(NAME).apply_chat_template(messages, tools=tools, tokenize=False)
    assert ours(NAME).encode_chat(messages, tools).text == prompt
    return prompt


def _expected_ids(*pieces) -> list[int]:
    """Ids built from mistral-common's tokenizer: special-token names, text chunks (each encoded alone, as
    mistral-common encodes chunks) and ("image", path) for an image encoded by mistral-common's ImageEncoder."""
    from mistral_common.protocol.instruct.chunk import ImageURLChunk

    mistral = reference(NAME).instruct_tokenizer
    ids = []
    for piece in pieces:
        if isinstance(piece, tuple):
            ids += mistral.image_encoder(ImageURLChunk(image_url=file_uri(piece[1]))).tokens
        elif piece.startswith(("<", "[")) and mistral.tokenizer.is_special(piece):
            ids.append(mistral.tokenizer.get_special_token(piece))
        else:
            ids += mistral.tokenizer.encode(piece, bos=False, eos=False)
    return ids


def test_system_message_anywhere_renders_in_place():
    messages = [user("Hi"), assistant("Hello!"), system("From now on, answer in French."), user("How are you?")]
    assert _render(messages) == (
        "<s>[INST] Hi[/INST] Hello!</s>[SYSTEM_PROMPT] From now on, answer in French.[/SYSTEM_PROMPT]"
        "[INST] How are you?[/INST]"
    )
    expected = _expected_ids(
        "<s>", "[INST]", "Hi", "[/INST]", "Hello!", "</s>",
        "[SYSTEM_PROMPT]", "From now on, answer in French.", "[/SYSTEM_PROMPT]", "[INST]", "How are you?", "[/INST]",
    )  # fmt: skip
    assert ours(NAME).encode_chat(messages).input_ids == expected
    assert hf_tokenizer(NAME).apply_chat_template(messages, tokenize=True, return_dict=False) == expected
    with pytest.raises(Exception, match="Unexpected role 'system' after role 'assistant'"):
        reference_encode(NAME, messages)  # an extension: mistral-common itself rejects this order


def test_consecutive_user_messages_each_get_their_own_inst():
    """The HF template's extension; our ChatTokenizer (the runtime) follows mistral-common, which merges them."""
    messages = [system("Two speakers."), user("Alice: hello"), user("Bob: hi"), user("Alice: bye")]
    prompt = hf_tokenizer(NAME).apply_chat_template(messages, tokenize=False)
    assert prompt == (
        "<s>[SYSTEM_PROMPT] Two speakers.[/SYSTEM_PROMPT][INST] Alice: hello[/INST][INST] Bob: hi[/INST]"
        "[INST] Alice: bye[/INST]"
    )
    expected = _expected_ids(
        "<s>", "[SYSTEM_PROMPT]", "Two speakers.", "[/SYSTEM_PROMPT]",
        "[INST]", "Alice: hello", "[/INST]", "[INST]", "Bob: hi", "[/INST]", "[INST]", "Alice: bye", "[/INST]",
    )  # fmt: skip
    assert hf_tokenizer(NAME).apply_chat_template(messages, tokenize=True, return_dict=False) == expected
    merged = _expected_ids(
        "<s>", "[SYSTEM_PROMPT]", "Two speakers.", "[/SYSTEM_PROMPT]",
        "[INST]", "Alice: hello\n\nBob: hi\n\nAlice: bye", "[/INST]",
    )  # fmt: skip
    assert reference_encode(NAME, messages).tokens == merged
    assert ours(NAME).encode_chat(messages).input_ids == merged


def test_images_in_user_assistant_and_tool_messages():
    c1 = call("img0chart", "get_weather", json.dumps({"city": "Nice"}))
    messages = [
        user([text("Draw a cat"), img(40, 24)]),
        assistant([img(33, 70), text("Here it is.")]),
        user("Now a chart"),
        assistant(None, [c1]),
        tool("img0chart", [text("chart:"), img(1300, 90)]),
    ]
    assert _render(messages, [WEATHER]) == (
        "<s>[INST][IMG] Draw a cat[/INST][IMG] Here it is.</s>"
        f"[AVAILABLE_TOOLS] {json.dumps([WEATHER], ensure_ascii=False)}[/AVAILABLE_TOOLS][INST] Now a chart[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Nice"}, "id": "img0chart"}]</s>'
        "[TOOL_RESULTS] img0chart[TOOL_CONTENT] chart:[IMG][/TOOL_RESULTS]"
    )
    expected = _expected_ids(
        "<s>", "[INST]", ("image", image_file(40, 24)), "Draw a cat", "[/INST]",
        ("image", image_file(33, 70)), "Here it is.", "</s>",
        "[AVAILABLE_TOOLS]", json.dumps([WEATHER], ensure_ascii=False), "[/AVAILABLE_TOOLS]",
        "[INST]", "Now a chart", "[/INST]",
        "[TOOL_CALLS]", '[{"name": "get_weather", "arguments": {"city": "Nice"}, "id": "img0chart"}]', "</s>",
        "[TOOL_RESULTS]", "img0chart", "[TOOL_CONTENT]", "chart:", ("image", image_file(1300, 90)), "[/TOOL_RESULTS]",
    )  # fmt: skip
    encoded = ours(NAME).encode_chat(messages, [WEATHER])
    assert encoded.input_ids == expected
    assert [tuple(i.shape) for i in encoded.images] == [(3, 32, 48), (3, 80, 48), (3, 80, 1024)]


def test_tools_go_before_the_last_user_message():
    c1 = call("a1B2c3D4e", "get_weather", json.dumps({"city": "Lyon"}))
    messages = [
        user("Weather in Lyon?"),
        assistant(None, [c1]),
        tool("a1B2c3D4e", '{"temp": 12}'),
        assistant("12 °C."),
        user("Thanks!"),
    ]
    tools_json = json.dumps([WEATHER], ensure_ascii=False)
    assert _render(messages, [WEATHER]) == (
        "<s>[INST] Weather in Lyon?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Lyon"}, "id": "a1B2c3D4e"}]</s>'
        '[TOOL_RESULTS] a1B2c3D4e[TOOL_CONTENT] {"temp": 12}[/TOOL_RESULTS] 12 °C.</s>'
        f"[AVAILABLE_TOOLS] {tools_json}[/AVAILABLE_TOOLS][INST] Thanks![/INST]"
    )
    assert ours(NAME).encode_chat(messages, [WEATHER]).input_ids == reference_encode(NAME, messages, [WEATHER]).tokens


def test_v3_keeps_mistral_common_rules():
    """The extensions are v7 only: Pixtral-12B (v3) rejects images outside user messages, in both paths."""
    messages = [user("Draw"), assistant([img(40, 24), text("done")])]
    with pytest.raises(QuantkitError, match="no images in assistant messages"):
        ours("pixtral-12b").encode_chat(messages)
    with pytest.raises(Exception, match="images are not supported in assistant messages"):
        hf_tokenizer("pixtral-12b").apply_chat_template(messages, tokenize=False)
