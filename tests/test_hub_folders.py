"""Hub-style HF folders (tokenizer.json + chat template, LlamaForCausalLM, tied embeddings) through every command,
checked against transformers: tokens of chats and raw prompts, greedy answers, quantized exports with the head
kept or quantized."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hub_models import build_tiny_llama
from safetensors import safe_open

from quantkit.cli import main

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hub") / "tiny-llama", tools_template=True)


@pytest.fixture(scope="module")
def hf_tokenizer(hub):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hub)


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0
    return result.output


def conversations(n: int = 24) -> list[tuple[list[dict], list[dict] | None]]:
    """Varied chats: with and without a system prompt, 1-4 turns, digits and unicode, tool calls and results."""
    rng = random.Random(0)
    texts = ["What is 12+30?", "Tell me about Paris.", "  spaces  and\ttabs ", "Zürich → 2024, 3.14159",
             "def f(x):\n    return x * 2", "ok", "日本語のテキスト", "Numbers 1 22 333 4444"]  # fmt: skip
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": rng.choice(texts)}] if i % 3 == 0 else []
        for _ in range(1 + i % 4):
            messages.append({"role": "user", "content": rng.choice(texts)})
            messages.append({"role": "assistant", "content": rng.choice(texts)})
        tools = None
        if i % 4 == 1:
            tools = [tool]
            messages.append({"role": "user", "content": "Weather in Paris?"})
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"id": "abc123def", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]})  # fmt: skip
            messages.append({"role": "tool", "tool_call_id": "abc123def", "content": '{"temp": 21}'})
        messages.append({"role": "user", "content": rng.choice(texts)})
        out.append((messages, tools))
    return out


def test_tokenize_equals_transformers_apply_chat_template(hub, hf_tokenizer, tmp_path):
    chats = conversations()
    assert len(chats) >= 20 and sum(t is not None for _, t in chats) >= 5
    for i, (messages, tools) in enumerate(chats):
        path = tmp_path / f"chat{i}.json"
        path.write_text(json.dumps({"messages": messages, "tools": tools}))
        ours = json.loads(cli("tokenize", hub, "--messages", path, "--json"))["input_ids"]
        theirs = hf_tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)  # fmt: skip
        assert ours == list(theirs), f"conversation {i}"


def test_text_mode_shows_the_rendered_template(hub, tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi there"}]))
    out = cli("tokenize", hub, "--messages", path)
    assert "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n" in out


def test_images_are_refused_with_one_line(hub, tmp_path, scene_image):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(scene_image)}}, {"type": "text", "text": "What is it?"}]}]))
    out = fails("tokenize", hub, "--messages", path)
    assert "takes no images" in out and len(out.strip().splitlines()) == 1


def test_a_folder_without_any_tokenizer_names_what_it_looked_for(hub, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((hub / "config.json").read_text())
    path = tmp_path / "m.json"
    path.write_text("[]")
    assert "tokenizer.json" in fails("tokenize", bare, "--messages", path)


def transformers_greedy(folder: Path, n: int) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


def test_run_raw_gives_transformers_greedy_tokens(hub):
    ids, expected = transformers_greedy(hub, 12)
    out = json.loads(cli("run", hub, "--raw", "--prompt", PROMPT, "--max-new-tokens", 12, "--json", "--quiet",
                         "--device", "cpu"))  # fmt: skip
    assert out["input_ids"] == ids
    assert out["output_ids"] == expected[: len(out["output_ids"])]
    assert len(out["output_ids"]) == 12 or out["output_ids"][-1] == 2  # stops only at <|im_end|>


def test_run_raw_refuses_images_and_system(hub, scene_image):
    assert "--raw" in fails("run", hub, "--raw", "--prompt", "x", "--system", "s")
    assert "--raw" in fails("run", hub, "--raw")


def test_llama_biases_are_refused(hub, tmp_path):
    folder = tmp_path / "biased"
    folder.mkdir()
    for f in hub.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((hub / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert "attention_bias is not supported" in fails("run", folder, "--prompt", "x")


@pytest.fixture(scope="module")
def quantized(hub, tmp_path_factory, one_thread) -> Path:
    dst = tmp_path_factory.mktemp("hubq") / "q4"
    cli("quantize", hub, dst, "--bits", 4, "--rows", 4, "--seq-len", 128, "--quiet")
    return dst


def test_quantize_with_defaults_keeps_the_tied_head_and_runs(quantized, hub):
    config = json.loads((quantized / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    names = [k for f in quantized.glob("*.safetensors") for k in sorted(safe_open(f, "pt").keys())]
    assert not any(n.startswith("lm_head") for n in names)  # the 16-bit head stays the embedding matrix
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert (quantized / "tokenizer.json").is_file() and (quantized / "tokenizer_config.json").is_file()
    out = json.loads(cli("run", quantized, "--raw", "--prompt", PROMPT, "--max-new-tokens", 4, "--json", "--quiet"))
    assert out["input_ids"] == transformers_greedy(hub, 1)[0] and len(out["output_ids"]) >= 1
    report = cli("eval", quantized, "--reference", hub, "--rows", 2, "--seq-len", 64, "--quiet")
    assert "KL divergence" in report


@pytest.mark.parametrize("fmt", ["gptq", "quantkit"])
def test_a_quantized_head_of_tied_embeddings_is_exported_untied(hub, tmp_path, one_thread, fmt):
    dst = tmp_path / "q"
    cli("quantize", hub, dst, "--bits", 4, "--head-bits", 8, "--group-size", 32, "--format", fmt, "--rows", 4,
        "--seq-len", 128, "--quiet")  # fmt: skip
    config = json.loads((dst / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    names = {k for f in dst.glob("*.safetensors") for k in sorted(safe_open(f, "pt").keys())}
    assert "model.embed_tokens.weight" in names and any(n.startswith("lm_head.") for n in names)
    assert "lm_head.weight" not in names
    out = json.loads(cli("run", dst, "--raw", "--prompt", PROMPT, "--max-new-tokens", 3, "--json", "--quiet"))
    assert len(out["output_ids"]) >= 1
    assert "lm_head 8" in cli("inspect", dst)


def test_serve_answers_the_openai_client_on_a_hub_folder(hub):
    from openai import OpenAI
    from serve_server import running_server

    with running_server(hub, "tiny-llama") as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)  # fmt: skip
        completion = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0)
    assert chat.usage.completion_tokens >= 1 and completion.usage.completion_tokens >= 1
    assert completion.usage.prompt_tokens == len(transformers_greedy(hub, 1)[0])
