"""Conversations mistral-common rejects are rejected by our ChatTokenizer too, as a one-line QuantkitError."""

from __future__ import annotations

import pytest
from tokenizer_cases import WEATHER, assistant, call, img, ours, reference_encode, system, text, tool, user

from quantkit.errors import QuantkitError

C1 = call("a1B2c3D4e", "get_weather", '{"city": "Rome"}')
C2 = call("Zz9Yy8Xx7", "get_weather", '{"city": "Oslo"}')

BAD = {
    "empty": ("mistral-large-2407", [], "non-empty list"),
    "unknown role": ("mistral-large-2407", [{"role": "robot", "content": "x"}], "unknown role"),
    "short call id": ("mistral-large-2407", [user("w?"), assistant(None, [call("abc", "f", "{}")])], "9 letters"),
    "bad result id": ("mistral-large-2407", [user("w?"), assistant(None, [C1]), tool("a1-B2c3D4", "x")], "9 letters"),
    "bad function name": ("mistral-large-2407", [user("w?"), assistant(None, [call("a1B2c3D4e", "no way!", "{}")])],
                          "function name"),
    "content and calls (v3)": ("mistral-large-2407", [user("w?"), assistant("hm", [C1]), tool("a1B2c3D4e", "x")],
                               "not both"),
    "empty assistant": ("mistral-large-2407", [user("w?"), assistant(""), user("x")], "need content or tool_calls"),
    "tool after user": ("mistral-large-2407", [user("w?"), tool("a1B2c3D4e", "x")], "cannot follow a user"),
    "system after assistant (v3)": ("mistral-large-2407", [user("a"), assistant("b"), system("c"), user("d")],
                                    "cannot follow a assistant"),
    "single assistant": ("mistral-large-2407", [assistant("hello")], "must start with a user or system"),
    "missing tool result": ("mistral-large-2407", [user("w?"), assistant(None, [C1, C2]), tool("a1B2c3D4e", "x"),
                                                   assistant("done"), user("ok")], "do not match up"),
    "image for text-only model": ("mistral-large-2407", [user([img(20, 20), text("what?")])], "takes no images"),
    "image in system (v3)": ("pixtral-12b", [system([img(20, 20)]), user("hi")], "no images in system"),
    "image in system (v7)": ("pixtral-large", [system([img(20, 20)]), user("hi")], "no images in system"),
    "tool message (v1)": ("mixtral", [user("w?"), assistant("x"), tool("a1B2c3D4e", "x")], "no tool messages"),
    "tool call (v1)": ("mixtral", [user("w?"), assistant(None, [C1])], "no tool calls"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_rejected_like_mistral_common(case):
    name, messages, message = BAD[case]
    tools = [WEATHER] if name != "mixtral" else None
    with pytest.raises(Exception):  # noqa: B017 - mistral-common raises several exception types
        reference_encode(name, messages, tools)
    with pytest.raises(QuantkitError, match=message) as error:
        ours(name).encode_chat(messages, tools)
    assert "\n" not in str(error.value)


def test_tools_on_v1_are_an_error_not_silently_dropped():
    """mistral-common's v1 tokenizer ignores `tools`; we refuse them so a Mixtral prompt never loses them quietly."""
    messages = [user("Weather in Rome?")]
    assert reference_encode("mixtral", messages, [WEATHER]).tokens == reference_encode("mixtral", messages).tokens
    with pytest.raises(QuantkitError, match="no tool support"):
        ours("mixtral").encode_chat(messages, [WEATHER])
