"""`quantkit serve` end to end: the real server on a free local port, spoken to with the official `openai` client.

Greedy answers (text, text + image, streamed or not) must be exactly what `quantkit run --json` gives for the same
messages, on a tiny converted Pixtral and on a tiny quantized one; prompts with tools must be the ids `quantkit
tokenize` gives; eight concurrent streams must each get their lone answer; a client that leaves mid-stream must stop
its generation and free its KV cache.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from click.testing import CliRunner  # noqa: E402
from serve_server import health, running_server, wait_for  # noqa: E402

from quantkit.cli import main  # noqa: E402

PROMPT = "What is in this image?"
TIMEOUT_S = 60  # per request: tiny models answer in well under a second
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "City weather", "parameters": CITY}}]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


def run_json(folder: Path, prompt: str, images=(), max_new_tokens: int = 8, system: str | None = None) -> dict:
    """`quantkit run --json`, the reference the server must equal."""
    args = ["run", folder, "--prompt", prompt, "--max-new-tokens", max_new_tokens, "--json", "--device", "cpu",
            "--backend", "torch", "--quiet"]  # fmt: skip
    for image in images:
        args += ["--image", image]
    if system:
        args += ["--system", system]
    return json.loads(cli(*args).stdout)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def extra(obj, key: str):
    return (obj.model_extra or {})[key]


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory) -> dict[str, Path]:
    src = tiny_models.get("pixtral_12b")["hf"]
    quantized = tmp_path_factory.mktemp("serve") / "pixtral-q4"
    cli("quantize", src, quantized, "--format", "quantkit", "--bits", "4", "--group-size", "32", "--rows", "4",
        "--seq-len", "64", "--quiet")  # fmt: skip
    return {"float": src, "quantized": quantized}


@pytest.fixture(scope="module", params=["float", "quantized"])
def served(request, folders, scene_image, one_thread):
    """The server, with --allowed-local-media-path the scene image's folder."""
    folder = folders[request.param]
    with running_server(folder, name="tiny-pixtral", media=scene_image.parent) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        yield folder, url, client, engine


def chat(client, messages, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny-pixtral", messages=messages,
                                          extra_body={"return_token_ids": True}, **kw)  # fmt: skip


def collect_stream(stream) -> tuple[str, list, object]:
    """(joined text, finish reasons, last chunk with usage) of a streamed chat completion."""
    text, finishes, usage, last = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
                last = choice
    return "".join(text), finishes, (usage, last)


def test_text_chat_equals_quantkit_run(served):
    folder, _, client, _ = served
    ref = run_json(folder, "Hello, who are you?", system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    response = chat(client, messages)
    choice = response.choices[0]
    assert extra(response, "prompt_token_ids") == ref["input_ids"]
    assert extra(choice, "token_ids") == ref["output_ids"]
    assert choice.message.content == ref["text"]
    assert choice.finish_reason == "length"
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref["input_ids"]), len(ref["output_ids"]))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_image_chat_streamed_and_not_equals_quantkit_run(served, scene_image):
    folder, _, client, _ = served
    ref = run_json(folder, PROMPT, [scene_image], max_new_tokens=6)
    for image_url in (data_uri(scene_image), {"url": str(scene_image)}):
        url = image_url if isinstance(image_url, dict) else {"url": image_url}
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": url}]
        messages = [{"role": "user", "content": content}]
        response = chat(client, messages, max_tokens=6)
        assert extra(response, "prompt_token_ids") == ref["input_ids"]
        assert extra(response.choices[0], "token_ids") == ref["output_ids"]
        assert response.choices[0].message.content == ref["text"]
        stream = chat(client, messages, max_tokens=6, stream=True, stream_options={"include_usage": True})
        text, finishes, (usage, last) = collect_stream(stream)
        assert text == ref["text"] and finishes == ["length"]
        assert extra(last, "token_ids") == ref["output_ids"]
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref["input_ids"]), 6)


def test_stop_strings_cut_the_answer_streamed_and_not(served):
    _, _, client, _ = served
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = chat(client, messages, max_tokens=12).choices[0].message.content
    assert len(full) >= 6, full
    stop = full[3:5]  # ends the answer inside its text, several tokens before max_tokens
    expected = full[: full.find(stop)]
    response = chat(client, messages, max_tokens=12, stop=[stop, "never-said"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 12
    text, finishes, _ = collect_stream(chat(client, messages, max_tokens=12, stop=stop, stream=True))
    assert text == expected and finishes == ["stop"]


def test_tools_render_as_quantkit_tokenize(served, tmp_path):
    folder, _, client, _ = served
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"messages": messages, "tools": TOOLS}))
    expected = json.loads(cli("tokenize", folder, "--messages", request, "--json").stdout)["input_ids"]
    response = chat(client, messages, tools=TOOLS, max_tokens=1)
    assert extra(response, "prompt_token_ids") == expected
    request.write_text(json.dumps({"messages": messages}))
    without = json.loads(cli("tokenize", folder, "--messages", request, "--json").stdout)["input_ids"]
    assert without != expected
    response = chat(client, messages, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert extra(response, "prompt_token_ids") == without


def test_an_answer_opening_with_tool_calls_is_returned_as_tool_calls(served, monkeypatch):
    """The model's [TOOL_CALLS] + JSON (as Mistral models write it) is scripted in place of the sampled tokens."""
    from quantkit.model.generate import Batch

    folder, _, client, engine = served
    tokenizer = engine.tokenizer
    call = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    script = [tokenizer.info.specials["[TOOL_CALLS]"], *tokenizer.encode_text(json.dumps(call)), tokenizer.eos_id]
    monkeypatch.setattr(Batch, "_pick", lambda self, row, logits: script[len(row.output_ids)])
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    choice = chat(client, messages, tools=TOOLS, max_tokens=len(script)).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert len(tool_call.id) == 9 and tool_call.id.isalnum()  # what mistral tokenizers accept back
    deltas, finishes = [], []
    for chunk in chat(client, messages, tools=TOOLS, max_tokens=len(script), stream=True):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            assert not c.delta.content
            finishes += [c.finish_reason] if c.finish_reason else []
    assert finishes == ["tool_calls"] and [d.function.name for d in deltas] == ["get_weather"]
    without_tools = chat(client, messages, max_tokens=len(script)).choices[0]  # no tools offered: plain text
    assert without_tools.message.content == json.dumps(call) and not without_tools.message.tool_calls


def test_local_images_are_read_only_inside_the_allowed_folder(served, scene_image, tmp_path):
    """--allowed-local-media-path: a path, file:// URI, relative path or symlink that resolves inside the folder
    gives `quantkit run`'s answer; a symlink or relative path leading out of it, /etc/passwd, another file, a
    folder and a missing file all get one and the same 400."""
    from quantkit.tokenizer.image import LOCAL_MEDIA_REFUSED

    folder, _, client, _ = served
    ref = run_json(folder, PROMPT, [scene_image], max_new_tokens=6)
    root = scene_image.parent
    outside = tmp_path / "outside.png"
    shutil.copy(scene_image, outside)
    link_out, link_in = root / f"out-{tmp_path.name}.png", root / f"in-{tmp_path.name}.png"
    link_out.symlink_to(outside)
    link_in.symlink_to(scene_image)
    inside = [str(scene_image), scene_image.as_uri(), scene_image.name, str(link_in)]
    refused = [str(link_out), os.path.relpath(outside, root), "/etc/passwd", str(outside), outside.as_uri(), str(root),
               str(root / "missing.png"), "missing.png"]  # fmt: skip
    for url in inside:
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}]
        response = chat(client, [{"role": "user", "content": content}], max_tokens=6)
        assert extra(response, "prompt_token_ids") == ref["input_ids"], url
        assert extra(response.choices[0], "token_ids") == ref["output_ids"], url
    errors = []
    for url in refused:
        content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": url}}]
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, [{"role": "user", "content": content}], max_tokens=6)
        errors.append((e.value.status_code, e.value.body["message"]))
    assert set(errors) == {(400, LOCAL_MEDIA_REFUSED)}, errors


TWO_TOOLS = [*TOOLS, {"type": "function", "function": {"name": "get_time", "description": "City time",
                                                      "parameters": CITY}}]  # fmt: skip


def test_tool_choice_required_or_named_always_gives_a_call(served):
    """On random weights the model would rarely call a tool: the forced opening makes every answer one, of an
    allowed function (any of the two for "required", the named one), streamed or not."""
    _, _, client, _ = served
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    seen = set()
    for i in range(20):
        for tool_choice, allowed in (("required", {"get_weather", "get_time"}), (named, {"get_time"})):
            choice = client.chat.completions.create(model="tiny-pixtral", messages=messages, tools=TWO_TOOLS,
                                                    tool_choice=tool_choice, max_tokens=24, temperature=1.0,
                                                    seed=i).choices[0]  # fmt: skip
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, (i, tool_choice)
            (call,) = choice.message.tool_calls
            assert call.function.name in allowed and isinstance(call.function.arguments, str)
            seen.add(call.function.name)
    assert seen <= {"get_weather", "get_time"}
    deltas = []
    for chunk in client.chat.completions.create(model="tiny-pixtral", messages=messages, tools=TWO_TOOLS,
                                                tool_choice=named, max_tokens=24, stream=True):  # fmt: skip
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            assert not c.delta.content
    assert [d.function.name for d in deltas] == ["get_time"]
    auto = chat(client, messages, tools=TWO_TOOLS, max_tokens=24)  # "auto": whatever the model writes
    assert auto.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_a_repeated_prompt_reuses_the_cached_prefix(served):
    _, url, client, _ = served
    messages = [{"role": "user", "content": "Tell me about the numbers " + " ".join(map(str, range(60)))}]
    first = chat(client, messages)
    before = health(url)
    again = chat(client, messages)
    after = health(url)
    n = len(extra(first, "prompt_token_ids"))
    assert after["prefix_cached_tokens"] - before["prefix_cached_tokens"] >= (n - 1) // 16 * 16 > 0
    assert extra(again.choices[0], "token_ids") == extra(first.choices[0], "token_ids")  # greedy


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_kv_cache_follows_the_tokens_in_use_not_the_context(folders, one_thread):
    """The model's context is 131,072 tokens; a streamed "hi" without max_tokens may run to it, but the cache
    holds only the tokens it has, so memory while it streams stays near idle."""
    from quantkit.model.config import load_model_config

    folder = folders["float"]
    assert load_model_config(folder).text.max_seq_len == 131072
    with running_server(folder, name="tiny-pixtral") as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        chat(client, [{"role": "user", "content": "warm up"}], max_tokens=4)
        idle = rss_bytes()
        stream = client.chat.completions.create(model="tiny-pixtral", messages=[{"role": "user", "content": "hi"}],
                                                stream=True)  # fmt: skip
        for chunks, _ in enumerate(stream, 1):
            if chunks == 64:
                break
        during, status = rss_bytes(), health(url)
        stream.close()
        print(f"RSS idle {idle / 1e6:.0f} MB, while streaming 'hi' {during / 1e6:.0f} MB; KV pool "
              f"{status['kv_cache_pool_tokens']} tokens of a {status['kv_cache_budget_tokens']}-token budget")
        assert status["kv_cache_allocated"] and status["kv_cache_pool_tokens"] <= 2048
        assert during <= 1.5 * idle
        wait_for(url, lambda s: not s["kv_cache_allocated"])


def test_kv_budget_refuses_what_cannot_fit_and_preempts_what_can(folders, one_thread):
    """A 256-token KV budget on a 131,072-token model: the context is capped to it, a longer request is a 400
    context_length_exceeded, and requests that together outgrow it take turns (the youngest is preempted and
    prefilled again) and all finish."""
    with running_server(folders["float"], name="tiny-pixtral", kv_cache_memory=str(256 * 1024)) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        assert client.models.list().data[0].model_extra["max_model_len"] == 256
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, [{"role": "user", "content": "word " * 400}], max_tokens=2)
        assert e.value.code == "context_length_exceeded" and "max model len of 256" not in e.value.body["message"]
        assert "the server's max model len is 256 tokens" in e.value.body["message"]
        requests = [dict(messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=150) for i in range(4)]
        for (_, finishes, (usage, _)), r in zip(concurrent_streams(client, requests), requests, strict=True):
            assert finishes in (["length"], ["stop"]) and usage.completion_tokens <= r["max_tokens"]
            assert finishes == ["stop"] or usage.completion_tokens == r["max_tokens"]
        status = health(url)
        print(f"preempted {status['preempted']} times; KV pool {status['kv_cache_pool_tokens']} tokens")
        assert status["kv_cache_pool_tokens"] <= 256 and not status["kv_cache_allocated"] and status["failed"] == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(folders, one_thread):
    """A 2,000-token prompt joins a running request: prefilled whole, it is one prefill call with no decode step
    inside; with --prefill-chunk 64 it is ~31 calls with a decode step of the running request after each. Counted
    inside the worker (the decode steps at each of the long prompt's prefill calls), so a slow test thread cannot
    add the running request's steps from before the prompt was admitted."""
    import queue

    from quantkit.model.generate import Sampling
    from quantkit.quantized_model import load_any
    from quantkit.serve.engine import Engine, Job
    from quantkit.tokenizer.chat import ChatTokenizer

    model = load_any(folders["float"], device="cpu", backend="torch", progress=False)
    tokenizer = ChatTokenizer.from_folder(folders["float"])
    long_ids = [tokenizer.bos_id, *(1000 + i % 5000 for i in range(1999))]
    calls: dict = {}
    for chunk in (None, 64):
        engine, events = Engine(model, tokenizer, prefill_chunk=chunk), queue.Queue()
        calls[chunk] = []
        prefill = engine.batch.prefill

        def counted(row, limit, prefill=prefill, seen=calls[chunk], engine=engine):
            if len(row.input_ids) == len(long_ids):
                seen.append(engine.stats["decode_steps"])  # the worker's own counter, read on the worker
            return prefill(row, limit)

        engine.batch.prefill = counted
        try:
            running = Job(tokenizer.encode_raw("Count"), [], Sampling(max_new_tokens=100000), events.put)
            engine.submit(running)
            assert events.get(timeout=TIMEOUT_S)[0] == "first"
            finished: queue.Queue = queue.Queue()
            engine.submit(Job(long_ids, [], Sampling(max_new_tokens=1), finished.put))
            for _ in range(5):  # first, text, done
                kind = finished.get(timeout=TIMEOUT_S)[0]
                if kind in ("done", "error"):
                    break
            assert kind == "done"
            running.cancel()
        finally:
            engine.close()
    assert len(calls[None]) == 1, calls
    assert len(calls[64]) >= 2000 // 64 - 2 and calls[64][-1] - calls[64][0] >= len(calls[64]) - 1, calls


def test_completions_on_the_chat_prompt_ids_give_the_chat_answer(served):
    folder, _, client, _ = served
    ref = run_json(folder, "Hello there")
    response = client.completions.create(model="tiny-pixtral", prompt=ref["input_ids"], max_tokens=8, temperature=0,
                                         extra_body={"return_token_ids": True})  # fmt: skip
    assert extra(response.choices[0], "token_ids") == ref["output_ids"]
    assert response.choices[0].text == ref["text"]
    assert response.usage.completion_tokens == len(ref["output_ids"])
    text = client.completions.create(model="tiny-pixtral", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert text.usage.completion_tokens == 3 and text.choices[0].finish_reason == "length"


def test_models_and_health(served):
    _, url, client, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny-pixtral"]
    assert health(url)["status"] == "ok"


PROMPTS = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]


def concurrent_streams(client, requests: list[dict]) -> list[tuple]:
    """Stream each request from its own thread, all at once; collect_stream's result for each, in order."""
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            stream = chat(client, stream=True, stream_options={"include_usage": True}, **requests[i])
            results[i] = collect_stream(stream)
        except BaseException as e:  # reported below: an exception in a thread would otherwise pass silently
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    assert not errors, errors
    return [results.get(i) for i in range(len(requests))]


def concurrent_answers(client, requests: list[dict]) -> list[str]:
    """Stream each request from its own thread, all at once; the answers' texts in order."""
    return [r[0] if r else None for r in concurrent_streams(client, requests)]


def test_eight_concurrent_streams_each_get_their_lone_answer(served):
    """Batched: the eight decode together (steps of up to 8 rows) and each greedy one gets exactly its lone answer.

    A seeded sampled request rides along; batched logits differ from lone ones in the last bits, so its tokens may
    differ from its lone run: it is checked for what holds exactly (it finishes, its length and usage agree, its
    ids are valid), and its seed for giving identical tokens when run alone twice."""
    _, url, client, engine = served
    requests = [dict(messages=[{"role": "user", "content": p}], max_tokens=6 + i % 3) for i, p in enumerate(PROMPTS)]
    sampled = 5
    requests[sampled] = dict(requests[sampled], temperature=0.8, top_p=0.9, seed=7)
    alone = [chat(client, **r).choices[0] for r in requests]
    texts = [c.message.content for c in alone]
    assert len(set(texts)) > 1  # different prompts, different answers: a mix-up would show
    again = chat(client, **requests[sampled]).choices[0]  # same seed, same (lone) batch: the same draws
    assert extra(again, "token_ids") == extra(alone[sampled], "token_ids") and again.message.content == texts[sampled]
    before = health(url)
    streams = concurrent_streams(client, requests)
    greedy = [i for i in range(len(requests)) if i != sampled]
    assert [streams[i][0] for i in greedy] == [texts[i] for i in greedy]
    _, finishes, (usage, last) = streams[sampled]
    ids, max_tokens = extra(last, "token_ids"), requests[sampled]["max_tokens"]
    ended = ids[-1] in engine.end_ids  # the end token is counted, as `quantkit run --json` does
    assert finishes == ["stop" if ended else "length"] and (ended or len(ids) == max_tokens) and len(ids) <= max_tokens
    assert usage.completion_tokens == len(ids) and all(0 <= t < engine.tokenizer.vocab_size for t in ids)
    after = health(url)
    assert after["max_batch"] == 8 and after["batched_steps"] > before["batched_steps"]
    assert after["max_batch_seen"] > 1 and not after["kv_cache_allocated"]


def test_max_batch_1_answers_concurrent_clients_one_at_a_time(folders, one_thread):
    with running_server(folders["float"], name="tiny-pixtral", max_batch=1) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        requests = [dict(messages=[{"role": "user", "content": p}], max_tokens=5) for p in PROMPTS[:4]]
        alone = [chat(client, **r).choices[0].message.content for r in requests]
        assert concurrent_answers(client, requests) == alone
        status = health(url)
        assert status["max_batch"] == 1 and status["max_batch_seen"] == 1 and status["completed"] == 8


def test_client_closing_mid_stream_stops_its_generation(served):
    _, url, client, _ = served
    before = health(url)
    max_tokens = 20000  # minutes of decoding: only a cancel ends it within the test's wait
    stream = chat(client, [{"role": "user", "content": "Count forever."}], max_tokens=max_tokens, stream=True)
    for chunks, _ in enumerate(stream, 1):
        if chunks == 4:
            break
    stream.close()
    status = wait_for(url, lambda s: s["cancelled"] > before["cancelled"])
    assert status["cancelled"] == before["cancelled"] + 1
    assert status["kv_caches_freed"] > before["kv_caches_freed"] and not status["kv_cache_allocated"]
    assert status["running"] is None
    assert status["generated_tokens"] - before["generated_tokens"] < max_tokens
    messages = [{"role": "user", "content": "Still there?"}]  # the server keeps answering
    assert chat(client, messages, max_tokens=3).usage.completion_tokens == 3


def test_client_leaving_a_non_streamed_request_stops_its_generation(served):
    import httpx

    _, url, _, _ = served
    before = health(url)
    body = {"messages": [{"role": "user", "content": "Count forever."}], "max_tokens": 20000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)  # gives up after 1 s and hangs up
    status = wait_for(url, lambda s: s["cancelled"] > before["cancelled"])
    assert status["cancelled"] == before["cancelled"] + 1 and not status["kv_cache_allocated"]
    assert status["generated_tokens"] - before["generated_tokens"] < 20000


def test_serve_command_starts_reports_and_stops(folders, tmp_path):
    """The CLI itself in a subprocess: startup lines, /health, and a clean stop on SIGINT."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantkit", "serve", str(folders["quantized"]), "--port",
                                 str(port), "--device", "cpu", "--backend", "torch", "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        status = None
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health(url)
            except Exception:
                time.sleep(0.2)
        assert status is not None and status["model"] == "pixtral-q4", log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "model: pixtral-q4" in text and "quantkit quantized, 4-bit" in text
    assert "device cpu: layers 0-1" in text and "GB of weights on cpu" in text
    assert f"serving at http://127.0.0.1:{port}/v1" in text
    assert "batch: up to 8 requests decoded together" in text
    assert "KV cache: budget" in text and "max model len 131072 (context 131072)" in text
    assert "local images: none (data: URIs only)" in text


def test_serve_refuses_a_busy_port_before_loading(folders):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(folders["float"]), "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}")


class PieceTokenizer:
    """Ids are indexes into a list of text pieces: enough to drive TextState exactly."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    ("pieces", "stop", "deltas", "text", "hit"),
    [
        (["Hel", "lo ", "wor", "ld"], [], ["Hel", "lo ", "wor", "ld"], "Hello world", False),
        (["Hel", "lo ", "EN", "D", "more"], ["END"], ["Hel", "lo ", "", ""], "Hello ", True),  # stop across tokens
        (["a", "E", "x", "END"], ["END"], ["a", "", "Ex", ""], "aEx", True),  # a held "E" is released when it diverges
        (["ab", "cd", "ef"], ["zz", "cde"], ["ab", "", ""], "ab", True),  # the earliest of several stops
        (["ab", "c"], ["cd"], ["ab", ""], "abc", False),  # held at the end, given back by finish()
    ],
)
def test_text_state_never_shows_a_stop_string(pieces, stop, deltas, text, hit):
    from quantkit.serve.engine import TextState

    state = TextState(PieceTokenizer(pieces), stop)
    got = []
    for i in range(len(pieces)):
        got.append(state.add(i, is_end=False))
        if state.hit_stop:
            break
    assert got == deltas[: len(got)] and state.hit_stop == hit
    rest = state.finish()
    assert "".join(got) + rest == text == state.text
