"""OpenAI request bodies -> the prompt ids and sampling settings `quantkit run` uses; answers -> OpenAI responses.

Chat prompts go through ChatTokenizer.encode_chat, the one code path of `quantkit run` and `quantkit tokenize`,
so a request's ids equal what those commands (and mistral-common) give for the same messages and tools. Every
problem with a request is an APIError that the app turns into OpenAI's `{"error": {...}}` body with a 4xx status.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.model.generate import Sampling
from quantkit.tokenizer.chat import ChatTokenizer, Encoded
from quantkit.tokenizer.image import local_media

MAX_STOP = 4  # OpenAI's limit on stop strings
_ID_CHARS = string.ascii_letters + string.digits  # mistral tool-call ids: 9 of these


class APIError(Exception):
    """A request the server refuses, with OpenAI's error fields and the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.message, self.status, self.code, self.param, self.kind = message, status, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """What a request asks of generation and of the answer's shape."""

    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False  # vLLM's extension: prompt_token_ids and token_ids in the response


@dataclass
class Prompt:
    """A request ready for the engine: prompt ids, images and settings."""

    encoded: Encoded
    params: Params
    tools: bool = False  # the prompt offers tools: an answer opening with [TOOL_CALLS] is parsed as tool calls
    forced: list[str] | None = None  # tool_choice "required" or a named function: the answer must call one of these


@dataclass
class Limits:
    """What the server lets a request use: `context` tokens of prompt and answer (the model's context, or less:
    --max-model-len, the KV cache budget), what that limit is called in errors, and the local image folder."""

    context: int
    label: str = "the model's context"
    media: Path | None = None  # --allowed-local-media-path; None: no local image files


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        what = "an integer" if integer else "a number"
        raise APIError(f"'{key}' must be {what} from {lo:g} to {hi:g}, got {value!r}", param=key)
    return value


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    return stops


def parse_params(body: dict, prompt_len: int, limits: Limits) -> Params:
    """Sampling and answer settings; max_tokens defaults to the rest of the context, as OpenAI's does."""
    context, label = limits.context, limits.label
    room = context - prompt_len
    if room < 1:
        raise APIError(
            f"the prompt is {prompt_len} tokens, {label} is {context} tokens: no room for an answer",
            code="context_length_exceeded", param="messages",
        )  # fmt: skip
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, room, 1, float("inf"), integer=True)
    if prompt_len + max_tokens > context:
        raise APIError(
            f"the prompt ({prompt_len} tokens) plus {key} ({max_tokens}) exceeds {label} of {context} tokens",
            code="context_length_exceeded", param=key,
        )  # fmt: skip
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    if body.get("logprobs"):
        raise APIError("logprobs are not supported by this server", param="logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(f"'seed' must be an integer, got {seed!r}", param="seed")
    sampling = Sampling(
        max_new_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 1e-9, 1)),
        seed=seed,
    )
    return Params(sampling, _stop(body.get("stop")), stream, bool(options.get("include_usage")),
                  bool(body.get("return_token_ids")))  # fmt: skip


def forced_names(tools: list | None, tool_choice: object) -> list[str] | None:
    """The functions an answer must call: every offered one for "required" / "any", the named one; else None."""
    if tool_choice not in ("required", "any") and not isinstance(tool_choice, dict):
        return None
    names = [(t.get("function") or {}).get("name") for t in tools or [] if isinstance(t, dict)]
    names = [n for n in names if isinstance(n, str)]
    if not names:
        raise APIError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
    return names


def select_tools(tools: object, tool_choice: object) -> list | None:
    """The tools the chat template renders: all of them for "auto"/"required"/"any", none for "none", the named
    one for {"type": "function", "function": {"name": ...}} (mistral-common has no tool_choice in the prompt)."""
    if tool_choice in (None, "auto", "required", "any"):
        return tools
    if tool_choice == "none":
        return None
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise APIError("'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name'}}",
                       param="tool_choice")  # fmt: skip
    chosen = [t for t in tools or [] if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
    if not chosen:
        raise APIError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return chosen


def parse_chat(body: dict, tokenizer: ChatTokenizer, limits: Limits) -> Prompt:
    """A /v1/chat/completions body -> prompt ids through the chat template (images and tools included); local
    image paths only as limits.media allows."""
    if "messages" not in body:
        raise APIError("'messages' is required", param="messages", code="missing_required_parameter")
    tools = select_tools(body.get("tools"), body.get("tool_choice"))
    forced = forced_names(tools, body.get("tool_choice"))
    try:
        with local_media(limits.media):
            encoded = tokenizer.encode_chat(body["messages"], tools)
    except QuantkitError as e:
        raise APIError(str(e), param="messages") from None
    return Prompt(encoded, parse_params(body, len(encoded.input_ids), limits), bool(tools), forced)


def parse_completion(body: dict, tokenizer: ChatTokenizer, limits: Limits) -> Prompt:
    """A /v1/completions body: a raw prompt (as `quantkit run --raw` encodes it, no chat template) or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode_raw(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        if not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise APIError(f"prompt token ids must be from 0 to {tokenizer.vocab_size - 1}", param="prompt")
        ids = list(prompt)
    else:
        raise APIError("'prompt' must be a string, a list of one string, or a list of token ids", param="prompt")
    if body.get("echo"):
        raise APIError("'echo' is not supported by this server", param="echo")
    return Prompt(Encoded(ids, [], ""), parse_params(body, len(ids), limits))


def tool_calls(text: str) -> list[dict] | None:
    """OpenAI tool_calls from what a model wrote after [TOOL_CALLS] (a JSON list of {name, arguments}); None when
    it is not that, so the answer stays plain text."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    out = []
    for c in calls:
        args = c.get("arguments", {})
        call_id = c.get("id") if isinstance(c.get("id"), str) else "".join(random.choices(_ID_CHARS, k=9))
        out.append({"id": call_id, "type": "function", "function": {
            "name": c["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})  # fmt: skip
    return out


def forced_prefix(name: str) -> str:
    """The text a forced call of `name` opens with (after [TOOL_CALLS]), as Mistral models write calls."""
    return f'[{{"name": {json.dumps(name)}, "arguments": {{'


def forced_calls(text: str, names: list[str]) -> list[dict] | None:
    """The call in a forced answer (one that opens with forced_prefix(name)) whose text is not a whole JSON list,
    e.g. cut by max_tokens: the name, and the arguments as far as they are a JSON object, else as written (OpenAI's
    arguments are a string that may not be valid JSON)."""
    for name in names:
        head = forced_prefix(name)
        if text.startswith(head):
            rest = text[len(head) - 1 :]  # from the arguments' "{"
            try:
                args = json.dumps(json.JSONDecoder().raw_decode(rest)[0])
            except json.JSONDecodeError:
                args = rest
            call_id = "".join(random.choices(_ID_CHARS, k=9))
            return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]
    return None
