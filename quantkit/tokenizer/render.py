"""Lay out checked messages as mistral-common's instruct formats v1, v3 and v7 do.

The result is a list of segments: ("special", "[INST]"), ("text", chunk) or ("image", PIL image). Each text
chunk is encoded on its own, exactly as mistral-common encodes it (so sentencepiece adds its dummy prefix per
chunk), which is why this is a list and not one string. Normalization follows mistral-common's, the source of
truth for what the model was trained on: consecutive user or assistant messages are merged with "\\n\\n" (the
HF v7 template instead gives each user message its own [INST], the Pixtral-Large community extension), v1/v3
fold all system messages into one prompt placed in the first (v1) or last (v3) user message, v7 keeps each
system message in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from PIL import Image

from quantkit.errors import QuantkitError
from quantkit.tokenizer.conversation import Message, Part, ToolCall

Segment = tuple[str, object]


@dataclass
class Turn:
    role: str
    content: str | list[Part]  # a string when it holds no image
    tool_calls: list[ToolCall]
    tool_call_id: str | None


def _coalesce(part_lists: list[list[Part]]) -> str | list[Part]:
    """mistral-common's chunk aggregation: drop empty texts, join neighbouring texts with "\\n\\n"."""
    out: list[Part] = []
    texts: list[str] = []
    for parts in part_lists:
        for part in parts:
            if isinstance(part, str):
                if part:
                    texts.append(("\n\n" if texts else "") + part)
            else:
                if texts:
                    out.append("".join(texts))
                    texts = []
                out.append(part)
    if not out:
        return "".join(texts)
    if texts:
        out.append("".join(texts))
    return out


def normalize(messages: list[Message], version: str) -> tuple[list[Turn], str | None]:
    merge = {"user", "assistant"}
    groups: list[list[Message]] = []
    for m in messages:
        if groups and m.role == groups[-1][0].role and m.role in merge:
            groups[-1].append(m)
        else:
            groups.append([m])
    turns, system = [], []
    for group in groups:
        first = group[0]
        if first.role == "system" and version != "v7":
            system += [_coalesce([m.parts]) for m in group if m.has_content]
            continue
        calls = [c for m in group for c in m.tool_calls]
        turns.append(Turn(first.role, _coalesce([m.parts for m in group]), calls, first.tool_call_id))
    if not turns or (version != "v7" and turns[0].role != "user"):
        turns.insert(0, Turn("user", "", [], None))
    return turns, "\n\n".join(system) or None


def _json_value(text: str) -> object:
    """mistral-common normalizes JSON text (empty -> {}) and embeds it parsed; other text stays a string."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _calls_json(calls: list[ToolCall]) -> str:
    payload = [{"name": c.name, "arguments": _json_value(c.arguments), "id": c.id} for c in calls]
    return json.dumps(payload, ensure_ascii=False)


def _chunks(content: str | list[Part]) -> list[Segment]:
    parts = [content] if isinstance(content, str) else content
    return [("text", p) if isinstance(p, str) else ("image", p) for p in parts]


def _image_first(content: list[Part]) -> list[Part]:
    """mistral-common moves a lone trailing image in front of the text before it."""
    if len(content) >= 2 and isinstance(content[-1], Image.Image) and all(isinstance(p, str) for p in content[:-1]):
        return [content[-1], *content[:-1]]
    return content


def _tools(tools: list[dict]) -> list[Segment]:
    if not tools:
        return []
    return [
        ("special", "[AVAILABLE_TOOLS]"),
        ("text", json.dumps(tools, ensure_ascii=False)),
        ("special", "[/AVAILABLE_TOOLS]"),
    ]


def _v1(turns: list[Turn], system: str | None, tools: list[dict]) -> list[Segment]:
    out: list[Segment] = [("special", "<s>")]
    for i, t in enumerate(turns):
        if t.role == "user":
            text = f"{system}\n\n{t.content}" if i == 0 and system else t.content
            out.append(("text", f"[INST] {text} [/INST]"))
        elif not t.content:
            raise QuantkitError("v1 assistant messages need text content")
        else:
            out += [("text", t.content), ("special", "</s>")]
    return out


def _v3(turns: list[Turn], system: str | None, tools: list[dict]) -> list[Segment]:
    last_user = max(i for i, t in enumerate(turns) if t.role == "user")
    out: list[Segment] = [("special", "<s>")]
    for i, t in enumerate(turns):
        if t.role == "user":
            prompt = system if i == last_user else None
            out += (_tools(tools) if i == last_user else []) + [("special", "[INST]")]
            if isinstance(t.content, str):
                out.append(("text", f"{prompt}\n\n{t.content}" if prompt else t.content))
            else:
                out += ([("text", prompt + "\n\n")] if prompt else []) + _chunks(_image_first(t.content))
            out.append(("special", "[/INST]"))
        elif t.role == "assistant":
            if t.tool_calls and t.content:
                raise QuantkitError("v3 assistant messages have content or tool_calls, not both")
            if t.tool_calls:
                out += [("special", "[TOOL_CALLS]"), ("text", _calls_json(t.tool_calls))]
            elif t.content:
                out.append(("text", t.content.rstrip(" ")))
            else:
                raise QuantkitError("assistant messages need content or tool_calls")
            out.append(("special", "</s>"))
        else:
            result = {"content": _json_value(t.content), "call_id": t.tool_call_id}
            out += [("special", "[TOOL_RESULTS]"), ("text", json.dumps(result, ensure_ascii=False))]
            out.append(("special", "[/TOOL_RESULTS]"))
    return out


def _v7(turns: list[Turn], system: str | None, tools: list[dict]) -> list[Segment]:
    last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
    out: list[Segment] = [("special", "<s>")]
    for i, t in enumerate(turns):
        if t.role == "system":
            out += [("special", "[SYSTEM_PROMPT]"), *_chunks(t.content), ("special", "[/SYSTEM_PROMPT]")]
        elif t.role == "user":
            content = t.content if isinstance(t.content, str) else _image_first(t.content)
            out += (_tools(tools) if i == last_user else []) + [("special", "[INST]")]
            out += [*_chunks(content), ("special", "[/INST]")]
        elif t.role == "assistant":
            if not t.content and not t.tool_calls:
                raise QuantkitError("assistant messages need content or tool_calls")
            if t.content:
                out += [("text", t.content.rstrip(" "))] if isinstance(t.content, str) else _chunks(t.content)
            if t.tool_calls:
                out += [("special", "[TOOL_CALLS]"), ("text", _calls_json(t.tool_calls))]
            out.append(("special", "</s>"))
        else:
            out += [("special", "[TOOL_RESULTS]"), ("text", t.tool_call_id), ("special", "[TOOL_CONTENT]")]
            out += [*_chunks(t.content), ("special", "[/TOOL_RESULTS]")]
    return out


_LAYOUTS = {"v1": _v1, "v3": _v3, "v7": _v7}


def render(messages: list[Message], tools: list[dict], version: str) -> list[Segment]:
    turns, system = normalize(messages, version)
    return _LAYOUTS[version](turns, system, tools)
