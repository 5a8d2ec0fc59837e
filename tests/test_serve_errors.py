"""Bad requests to `quantkit serve`: each a 4xx with OpenAI's error body, and the server healthy afterwards.

The server runs with an API key on a tiny Pixtral whose config says a 256-token context (the same weights, linked),
so an over-long prompt is cheap to send.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from serve_server import health, running_server  # noqa: E402

KEY = "test-key-123"
CONTEXT = 256
TIMEOUT_S = 60
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory, one_thread):
    src = tiny_models.get("pixtral_12b")["hf"]
    folder = tmp_path_factory.mktemp("short-context") / "tiny"
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    with running_server(folder, name="tiny", api_key=KEY) as (url, engine):
        yield url


def image_part(url: str) -> list[dict]:
    content = [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": content}]


def chat_body(**kw) -> dict:
    return {"model": "tiny", "messages": USER, "max_tokens": 2, **kw}


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"this is not a png").decode()
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"

# (name, method, path, body: dict | str | None, headers, status, text the message must hold)
CASES = [
    ("malformed JSON", "POST", CHAT, '{"model": "tiny", "messages": [', AUTH, 400, "not valid JSON"),
    ("body not an object", "POST", CHAT, "[1, 2]", AUTH, 400, "JSON object"),
    ("unknown model", "POST", CHAT, chat_body(model="gpt-4o"), AUTH, 404, "does not exist"),
    ("missing messages", "POST", CHAT, {"model": "tiny"}, AUTH, 400, "'messages' is required"),
    ("empty messages", "POST", CHAT, chat_body(messages=[]), AUTH, 400, "non-empty list"),
    ("unknown role", "POST", CHAT, chat_body(messages=[{"role": "robot", "content": "x"}]), AUTH, 400, "unknown role"),
    ("assistant first", "POST", CHAT, chat_body(messages=[{"role": "assistant", "content": "x"}]), AUTH, 400,
     "must start with"),
    ("prompt longer than the context", "POST", CHAT, chat_body(messages=[{"role": "user", "content": "word " * 400}]),
     AUTH, 400, f"context is {CONTEXT} tokens"),
    ("max_tokens past the context", "POST", CHAT, chat_body(max_tokens=CONTEXT), AUTH, 400,
     "exceeds the model's context"),
    ("unreadable image", "POST", CHAT, chat_body(messages=image_part(NOT_AN_IMAGE)), AUTH, 400, "not a readable image"),
    ("bad base64 image", "POST", CHAT, chat_body(messages=image_part("data:image/png;base64,@@@")), AUTH, 400,
     "invalid base64"),
    ("remote image URL", "POST", CHAT, chat_body(messages=image_part("https://example.com/cat.png")), AUTH, 400,
     "remote image URLs are not supported"),
    ("local image file", "POST", CHAT, chat_body(messages=image_part("/nonexistent/cat.png")), AUTH, 400,
     "local image files are not allowed"),
    ("wrong API key", "POST", CHAT, chat_body(), {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("no API key", "GET", "/v1/models", None, {}, 401, "API key"),
    ("temperature out of range", "POST", CHAT, chat_body(temperature=5), AUTH, 400, "'temperature'"),
    ("max_tokens zero", "POST", CHAT, chat_body(max_tokens=0), AUTH, 400, "'max_tokens'"),
    ("several choices", "POST", CHAT, chat_body(n=2), AUTH, 400, "'n'"),
    ("five stop strings", "POST", CHAT, chat_body(stop=list("abcde")), AUTH, 400, "'stop'"),
    ("tool_choice names no tool", "POST", CHAT, chat_body(tool_choice={"type": "function", "function": {"name": "x"}}),
     AUTH, 400, "not among the tools"),
    ("stream not a boolean", "POST", CHAT, chat_body(stream="yes"), AUTH, 400, "'stream'"),
    ("completion prompt of wrong type", "POST", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, AUTH, 400,
     "'prompt'"),
    ("token id out of range", "POST", "/v1/completions", {"model": "tiny", "prompt": [1, 10**9]}, AUTH, 400,
     "token ids"),
    ("wrong method", "GET", CHAT, None, AUTH, 405, "Method Not Allowed"),
    ("unknown route", "POST", "/v1/embeddings", {}, AUTH, 404, "Not Found"),
    ("unknown model card", "GET", "/v1/models/other", None, AUTH, 404, "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_with_an_openai_error(server, case):
    _, method, path, body, headers, status, text = case
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    response = httpx.request(method, server + path, content=content, headers={**headers, "Content-Type":
                             "application/json"}, timeout=TIMEOUT_S)  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"] and isinstance(error["type"], str)


def test_server_is_healthy_and_answers_after_bad_requests(server):
    for case in CASES:  # all of them again, back to back, then a good request
        _, method, path, body, headers, status, _ = case
        content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
        assert httpx.request(method, server + path, content=content, headers=headers, timeout=TIMEOUT_S).status_code \
            == status  # fmt: skip
    status = health(server)
    assert status["status"] == "ok" and status["failed"] == 0 and not status["kv_cache_allocated"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    response = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0)
    assert response.usage.completion_tokens == 3


def test_openai_client_raises_its_own_error_types(server):
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", timeout=TIMEOUT_S, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        good.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}], max_tokens=2)
    assert e.value.code == "context_length_exceeded"


def test_local_image_paths_get_one_refusal_without_the_flag(server, scene_image, tmp_path):
    """Without --allowed-local-media-path no local file is read: a PNG that exists, its file:// URI, a relative
    path to it, a symlink, /etc/passwd and a missing file get the same 400, so nothing tells which files exist."""
    from quantkit.tokenizer.image import LOCAL_MEDIA_REFUSED

    link = tmp_path / "link.png"
    link.symlink_to(scene_image)
    urls = [str(scene_image), scene_image.as_uri(), os.path.relpath(scene_image), str(link), "/etc/passwd",
            str(tmp_path / "missing.png")]  # fmt: skip
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=TIMEOUT_S, max_retries=0)
    errors = []
    for url in urls:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=image_part(url), max_tokens=2)
        errors.append((e.value.status_code, e.value.body["message"], e.value.body["param"]))
    assert set(errors) == {(400, LOCAL_MEDIA_REFUSED, "messages")}, errors


@pytest.mark.parametrize("where", ["quantkit.model.generate.Batch.step", "quantkit.serve.engine.TextState.add"])
def test_a_failing_batch_fails_its_requests_with_a_500_and_the_worker_lives(server, monkeypatch, where):
    """A bug or an out-of-memory in a decode step (or in the text handling after it) fails the requests in the
    batch with OpenAI's error body; the next request is answered."""
    import importlib

    module, cls, name = where.rsplit(".", 2)
    target = getattr(importlib.import_module(module), cls)
    real = getattr(target, name)
    calls = []

    def broken(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the first call is the prefill's token (TextState.add) or a decode step (Batch.step)
            raise RuntimeError("simulated failure")
        return real(self, *args)

    monkeypatch.setattr(target, name, broken)
    body = {"model": "tiny", "messages": USER, "max_tokens": 5, "temperature": 0}
    response = httpx.post(server + CHAT, json=body, headers=AUTH, timeout=TIMEOUT_S)
    assert response.status_code == 500, response.text
    assert "simulated failure" in response.json()["error"]["message"]
    status = health(server)
    assert status["failed"] >= 1 and not status["kv_cache_allocated"] and status["running"] is None
    response = httpx.post(server + CHAT, json=body, headers=AUTH, timeout=TIMEOUT_S)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5


def test_missing_serve_extra_names_the_install_from_the_checkout(monkeypatch, tmp_path):
    """`quantkit` on PyPI is someone else's package: the hint must install the extra from this checkout."""
    import sys

    from quantkit.errors import QuantkitError
    from quantkit.serve.server import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError, as when missing
    with pytest.raises(QuantkitError) as e:
        serve(tmp_path)
    message = str(e.value)
    assert "uvicorn is missing" in message and 'pip install -e ".[serve]"' in message
    assert "quantkit[serve]" not in message


@pytest.mark.parametrize(("args", "message"), [
    (["--max-model-len", "200000"], "--max-model-len 200000 is more than the model's context of 131072 tokens"),
    (["--kv-cache-memory", "lots"], "cannot parse size 'lots'"),
    (["--allowed-local-media-path", "/nonexistent/folder"], "/nonexistent/folder is not a folder"),
])  # fmt: skip
def test_serve_refuses_bad_kv_and_media_options_before_loading(tiny_models, args, message):
    from click.testing import CliRunner

    from quantkit.cli import main

    folder = tiny_models.get("pixtral_12b")["hf"]
    result = CliRunner().invoke(main, ["serve", str(folder), "--device", "cpu", "--port", "0", *args])
    assert result.exit_code != 0 and message in result.output, result.output


def test_kv_budget_and_context_limit():
    from quantkit.errors import QuantkitError
    from quantkit.serve.server import context_limit, kv_share

    assert kv_share(None) is None and kv_share("0.5") == 0.5 and kv_share("1") == 1.0 and kv_share("2GB") is None
    assert context_limit(131072, 4096, None) == 4096 and context_limit(1000, 4096, None) == 1000
    assert context_limit(131072, 4096, 2048) == 2048
    with pytest.raises(QuantkitError, match="does not fit in the KV cache budget of 4096 tokens"):
        context_limit(131072, 4096, 8192)
