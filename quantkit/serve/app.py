"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions and /health.

Request bodies are read as plain JSON and checked by quantkit.serve.protocol, so every refusal, from malformed
JSON to an unreadable image, is a 4xx with OpenAI's error body; an unexpected failure is a 500 of the same shape
and the server keeps serving. Tokenizing (image decoding included) runs in a thread pool, generation on the
engine's worker; streams are server-sent events ending in `data: [DONE]`, and a stream whose client goes away
cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from quantkit.model.generate import Prefixes
from quantkit.serve import protocol
from quantkit.serve.engine import Busy, Engine, Job, Usage
from quantkit.serve.protocol import APIError, Limits, Prompt, parse_chat, parse_completion, tool_calls

log = logging.getLogger("quantkit.serve")
POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


class _Stream(StreamingResponse):
    """A stream that cancels its job however it ends (a client disconnect included)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            await self.body_iterator.aclose()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}  # fmt: skip


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(APIError(message, e.status_code, code).body(), status_code=e.status_code)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    body = APIError(f"internal server error: {type(e).__name__}", 500, kind="server_error").body()
    return JSONResponse(body, status_code=500)


async def collect(request: Request, job: Job, events: asyncio.Queue) -> Usage:
    """Wait for a non-streamed answer; a client that leaves meanwhile cancels it."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), POLL_S)
        except asyncio.TimeoutError:
            event = ("wait",)
        if time.monotonic() - checked >= POLL_S:  # tokens may arrive faster than POLL_S: check by the clock
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
                raise APIError("the client disconnected", 499, "client_closed")
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise APIError(event[1], event[2], kind="server_error" if event[2] >= 500 else "invalid_request_error")


def extras(prompt: Prompt, usage: Usage | None) -> tuple[dict, dict]:
    """vLLM's return_token_ids: prompt ids on the response, generated ids on the choice."""
    if not prompt.params.return_token_ids:
        return {}, {}
    return {"prompt_token_ids": prompt.encoded.input_ids}, ({"token_ids": usage.output_ids} if usage else {})


class _API:
    """The endpoints of one loaded model within `limits`. create_app routes to its methods."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits, api_key: str | None):
        self.engine, self.model_name, self.limits, self.api_key = engine, model_name, limits, api_key
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        self.tool_calls_id = self.tokenizer.info.specials.get("[TOOL_CALLS]")
        self.has_vision = engine.model.vision_tower is not None

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError("invalid or missing API key (send 'Authorization: Bearer KEY')", 401, "invalid_api_key")

    async def read_body(self, request: Request) -> dict:
        self.authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", code="invalid_json")
        return body

    async def prepare(self, request: Request, parse: Callable) -> Prompt:
        body = await self.read_body(request)
        if body.get("model") not in (None, self.model_name):
            raise APIError(f"the model {body['model']!r} does not exist; this server serves {self.model_name!r}", 404,
                           "model_not_found", "model")  # fmt: skip
        prompt = await run_in_threadpool(parse, body, self.tokenizer, self.limits)
        if prompt.encoded.images and not self.has_vision:
            raise APIError(f"{self.model_name} is a text-only model: it takes no images", param="messages")
        return prompt

    def start(self, prompt: Prompt) -> tuple[Job, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        e = prompt.encoded
        job = Job(e.input_ids, e.images, prompt.params.sampling, emit, prompt.params.stop,
                  prefixes=self.prefixes(prompt))  # fmt: skip
        try:
            self.engine.submit(job)
        except Busy as b:
            raise APIError(f"the server is busy: {b}; retry later", 429, "server_busy", kind="rate_limit_error") \
                from None
        return job, events

    def prefixes(self, prompt: Prompt) -> Prefixes | None:
        """A forced tool call (tool_choice "required" or a named function): the answer must open with [TOOL_CALLS]
        and the JSON of a call of one of the allowed functions up to its arguments' "{", as vLLM forces it."""
        if not prompt.forced:
            return None
        if self.tool_calls_id is None:
            raise APIError("this model's tokenizer has no [TOOL_CALLS] token: tool_choice cannot force a call",
                           param="tool_choice")  # fmt: skip
        encode = self.tokenizer.encode_text
        sequences = [[self.tool_calls_id, *encode(protocol.forced_prefix(n))] for n in prompt.forced]
        longest = max(map(len, sequences))
        if prompt.params.sampling.max_new_tokens <= longest:
            raise APIError(f"max_tokens must be over {longest} for a forced tool call", param="max_tokens")
        return Prefixes(sequences)

    def opens_call(self, prompt: Prompt, output_ids: list[int]) -> bool:
        """A request with tools got an answer that opens with [TOOL_CALLS]."""
        return bool(prompt.tools and output_ids) and self.tool_calls_id is not None \
            and output_ids[0] == self.tool_calls_id  # fmt: skip

    def answer_calls(self, prompt: Prompt, output_ids: list[int], text: str) -> list[dict] | None:
        """OpenAI tool_calls for an answer that opens_call; a forced call is one even when its JSON is not whole."""
        if not self.opens_call(prompt, output_ids):
            return None
        calls = tool_calls(text)
        return protocol.forced_calls(text, prompt.forced) if calls is None and prompt.forced else calls

    async def stream(
        self,
        prompt: Prompt,
        job: Job,
        events: asyncio.Queue,
        chunk: Callable[[str | None, str | None], dict],
        first: dict | None,
    ) -> AsyncIterator[str]:
        """Server-sent events; an answer that may be tool calls is held back and sent as one tool_calls delta."""
        if first is not None:
            yield _sse(first)
        held: list[str] | None = None
        while True:
            event = await events.get()
            if event[0] == "first":
                held = [] if self.opens_call(prompt, [event[1]]) else None
            elif event[0] == "text":
                if held is None:
                    yield _sse(chunk(event[1], None))
                else:
                    held.append(event[1])
            elif event[0] == "error":
                kind = "server_error" if event[2] >= 500 else "invalid_request_error"
                yield _sse({"error": {"message": event[1], "type": kind, "param": None, "code": None}})
                break
            else:
                usage: Usage = event[1]
                finish = usage.finish_reason
                if held is not None:
                    calls = self.answer_calls(prompt, usage.output_ids, "".join(held))
                    if calls:
                        delta = chunk(None, None)
                        delta["choices"][0]["delta"] = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                        yield _sse(delta)
                        finish = "tool_calls"
                    else:
                        yield _sse(chunk("".join(held), None))
                top, choice = extras(prompt, usage)
                last = chunk(None, finish)
                last["choices"][0].update(choice)
                yield _sse({**last, **top})
                if prompt.params.include_usage:
                    yield _sse({**chunk(None, None), "choices": [], "usage": _usage(usage)})
                break
        yield "data: [DONE]\n\n"

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, **self.engine.status()}

    async def models(self, request: Request) -> dict:
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, name: str, request: Request) -> dict:
        self.authorize(request)
        if name != self.model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {self.model_name!r}", 404,
                           "model_not_found", "model")  # fmt: skip
        return self.model_card()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "quantkit",
                "max_model_len": self.limits.context}  # fmt: skip

    async def chat_completions(self, request: Request):
        prompt = await self.prepare(request, parse_chat)
        job, events = self.start(prompt)
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "created": now, "model": self.model_name}

        if prompt.params.stream:
            def chunk(text: str | None, finish: str | None) -> dict:
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return _Stream(self.stream(prompt, job, events, chunk, first), job)

        usage = await collect(request, job, events)
        message, finish = {"role": "assistant", "content": usage.text}, None
        calls = self.answer_calls(prompt, usage.output_ids, usage.text)
        if calls:
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        top, choice = extras(prompt, usage)
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": finish or usage.finish_reason, **choice}  # fmt: skip
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(usage), **top}

    async def completions(self, request: Request):
        prompt = await self.prepare(request, parse_completion)
        job, events = self.start(prompt)
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": self.model_name}

        if prompt.params.stream:
            def chunk(text: str | None, finish: str | None) -> dict:
                return {**head, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}  # fmt: skip

            return _Stream(self.stream(prompt, job, events, chunk, None), job)

        usage = await collect(request, job, events)
        top, choice = extras(prompt, usage)
        choice = {"index": 0, "text": usage.text, "logprobs": None,
                  "finish_reason": usage.finish_reason, **choice}  # fmt: skip
        return {**head, "choices": [choice], "usage": _usage(usage), **top}


def create_app(engine: Engine, model_name: str, context: int, api_key: str | None = None, media: Path | None = None,
               context_label: str = "the model's context") -> FastAPI:  # fmt: skip
    """The app for one loaded model; `context` is the most tokens of prompt and answer a request may have (called
    context_label in errors); local image files are read only inside `media` (None: none)."""
    api = _API(engine, model_name, Limits(context, context_label, media), api_key)
    app = FastAPI(title="quantkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    return app
