"""Read OpenAI-format messages and tools, and check them with mistral-common's rules (as one-line errors).

Everything a model cannot be prompted with fails here, before any token is produced: unknown roles, bad
content parts, images the tokenizer cannot take, tool-call ids that are not 9 letters or digits, role
orders mistral-common rejects. Images are opened here too, so a missing file is reported early.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from quantkit.errors import QuantkitError
from quantkit.tokenizer.image import load_image

ROLES = ("system", "user", "assistant", "tool")
_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# role -> roles allowed to follow it (mistral-common's validator); v7 also allows a system message anywhere.
_NEXT = {
    "system": {"user", "assistant", "system"},
    "user": {"user", "assistant", "system"},
    "assistant": {"user", "assistant", "tool"},
    "tool": {"user", "assistant", "tool"},
}

Part = str | Image.Image


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # as given: JSON text, or json.dumps of a dict


@dataclass
class Message:
    role: str
    parts: list[Part]  # text (possibly empty) and images, in order
    has_content: bool  # mistral-common tests `message.content` for truthiness
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Rules:
    """What a tokenizer version accepts."""

    version: str
    image_roles: frozenset[str]  # roles whose content may hold images
    tools: bool
    system_anywhere: bool
    content_and_calls: bool  # an assistant message may have both content and tool calls


def rules_for(version: str, multimodal: bool) -> Rules:
    if version == "v1":
        return Rules(version, frozenset(), False, False, False)
    if version == "v3":
        return Rules(version, frozenset({"user"} if multimodal else ()), True, False, False)
    if version == "v7":
        roles = {"user", "assistant", "tool"} if multimodal else ()
        return Rules(version, frozenset(roles), True, True, True)
    raise QuantkitError(f"tokenizer version {version} is not supported (supported: v1, v3, v7)")


def parse_messages(messages: object, rules: Rules, base_dir: Path | None = None) -> list[Message]:
    """Validate and convert a list of OpenAI chat messages; image paths are relative to base_dir."""
    if not isinstance(messages, list) or not messages:
        raise QuantkitError("messages must be a non-empty list")
    parsed = [_parse_message(i, m, rules, base_dir) for i, m in enumerate(messages, 1)]
    _check_order(parsed, rules)
    return parsed


def parse_tools(tools: object, rules: Rules) -> list[dict]:
    """OpenAI function tools -> what mistral-common serializes: {type, function: {name, description, parameters}}."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise QuantkitError("tools must be a list")
    if tools and not rules.tools:
        raise QuantkitError(f"the {rules.version} instruct format has no tool support")
    out = []
    for i, tool in enumerate(tools, 1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise QuantkitError(f"tool {i}: expected {{'type': 'function', 'function': {{...}}}}")
        name, parameters = function.get("name"), function.get("parameters", {})
        if not isinstance(name, str) or not _NAME.match(name):
            raise QuantkitError(f"tool {i}: function name must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(parameters, dict):
            raise QuantkitError(f"tool {i}: parameters must be a JSON schema object")
        description = function.get("description") or ""
        function = {"name": name, "description": description, "parameters": parameters}
        out.append({"type": "function", "function": function})
    return out


def _parse_message(index: int, message: object, rules: Rules, base_dir: Path | None) -> Message:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise QuantkitError(f"{where}: expected an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise QuantkitError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
    content = message.get("content")
    if content is None and role != "assistant":
        raise QuantkitError(f"{where}: {role} messages need content")
    parts = _parse_content(where, role, content, rules, base_dir)
    out = Message(role, parts, bool(content))
    if role == "assistant":
        out.tool_calls = _parse_tool_calls(where, message.get("tool_calls"), rules)
        if not out.has_content and not out.tool_calls:
            raise QuantkitError(f"{where}: assistant messages need content or tool_calls")
        if out.has_content and out.tool_calls and not rules.content_and_calls:
            raise QuantkitError(f"{where}: {rules.version} assistant messages have content or tool_calls, not both")
    if role == "tool":
        if not rules.tools:
            raise QuantkitError(f"{where}: the {rules.version} instruct format has no tool messages")
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
            raise QuantkitError(f"{where}: tool_call_id must be 9 letters or digits, got {call_id!r}")
        name = message.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise QuantkitError(f"{where}: tool name must be 1-64 letters, digits, '_' or '-'")
        out.tool_call_id = call_id
    return out


def _parse_content(where: str, role: str, content: object, rules: Rules, base_dir: Path | None) -> list[Part]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise QuantkitError(f"{where}: content must be a string or a list of parts")
    parts: list[Part] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise QuantkitError(f"{where}: a text part needs a string 'text'")
            parts.append(part["text"])
        elif kind == "image_url":
            if role not in rules.image_roles:
                raise QuantkitError(f"{where}: this tokenizer takes no images in {role} messages")
            url = part.get("image_url")
            parts.append(load_image(url.get("url") if isinstance(url, dict) else url, base_dir))
        else:
            raise QuantkitError(f"{where}: unsupported content part {kind!r} (expected 'text' or 'image_url')")
    return parts


def _parse_tool_calls(where: str, calls: object, rules: Rules) -> list[ToolCall]:
    if not calls:
        return []
    if not rules.tools:
        raise QuantkitError(f"{where}: the {rules.version} instruct format has no tool calls")
    if not isinstance(calls, list):
        raise QuantkitError(f"{where}: tool_calls must be a list")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise QuantkitError(f"{where}: each tool call needs a 'function' object")
        call_id, name, args = call.get("id"), function.get("name"), function.get("arguments")
        if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
            raise QuantkitError(f"{where}: tool call ids must be 9 letters or digits, got {call_id!r}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise QuantkitError(f"{where}: function name must be 1-64 letters, digits, '_' or '-'")
        if isinstance(args, dict):
            args = json.dumps(args)
        elif args is None:
            args = "{}"
        elif not isinstance(args, str):
            raise QuantkitError(f"{where}: tool call arguments must be a JSON string or an object")
        out.append(ToolCall(call_id, name, args))
    return out


def _check_order(messages: list[Message], rules: Rules) -> None:
    if len(messages) == 1 and messages[0].role not in ("user", "system"):
        raise QuantkitError("a conversation must start with a user or system message")
    pending = 0  # tool results still expected for the last assistant's tool calls
    for i, (prev, msg) in enumerate(zip(messages, messages[1:], strict=False), 2):
        allowed = _NEXT[prev.role] | ({"system"} if rules.system_anywhere else set())
        if msg.role not in allowed:
            raise QuantkitError(f"message {i}: a {msg.role} message cannot follow a {prev.role} message")
        if msg.role == "tool":
            pending -= 1
        elif msg.role == "assistant":
            if pending:
                raise QuantkitError(f"message {i}: the previous tool calls and tool results do not match up")
            pending = len(msg.tool_calls)
