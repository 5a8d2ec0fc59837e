"""Shared material for the tokenizer tests: the four real tokenizer files shipped with mistral-common, the
converted folders built from them (once per session), the references, test images and the conversation corpus.

The corpus is written in the OpenAI format. Each case says whether mistral-common accepts it as is (`mode`:
"test", or "finetuning" for chats that end with the assistant) and whether the HF template can match it
(`hf`: False where the text holds special-token strings, which a HF tokenizer always treats as special, or
non-canonical JSON, which a Jinja template cannot re-serialize).
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import mistral_common
import numpy as np
from PIL import Image

DATA = Path(mistral_common.__file__).parent / "data"

# name -> (file in mistral-common's data folder, name it has in a real checkpoint)
TOKENIZERS = {
    "pixtral-12b": ("tekken_240911.json", "tekken.json"),
    "pixtral-large": ("mistral_instruct_tokenizer_241114.model.v7m1", "tokenizer.model.v7m1"),
    "mistral-large-2407": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
    "mixtral": ("tokenizer.model.v1", "tokenizer.model"),
}
MULTIMODAL = {"pixtral-12b", "pixtral-large"}
VERSION = {"pixtral-12b": "v3", "pixtral-large": "v7", "mistral-large-2407": "v3", "mixtral": "v1"}

_ROOT = Path(tempfile.mkdtemp(prefix="quantkit-tokenizer-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@cache
def native_folder(name: str) -> Path:
    """A folder holding only the tokenizer file, under its checkpoint name."""
    folder = _ROOT / "native" / name
    folder.mkdir(parents=True)
    source, target = TOKENIZERS[name]
    shutil.copyfile(DATA / source, folder / target)
    return folder


@cache
def converted_folder(name: str) -> Path:
    """write_tokenizer_files' output for one tokenizer (what `quantkit convert` writes)."""
    from quantkit.tokenizer.hf import write_tokenizer_files
    from quantkit.tokenizer.source import find_tokenizer_file, read_tokenizer_info

    out = _ROOT / "converted" / name
    write_tokenizer_files(read_tokenizer_info(find_tokenizer_file(native_folder(name))), out)
    return out


@cache
def reference(name: str, mode: str = "test"):
    """mistral-common's MistralTokenizer for the same file, in validation mode `mode` ("test" or "finetuning")."""
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if mode == "test":
        return MistralTokenizer.from_file(str(DATA / TOKENIZERS[name][0]), mode=ValidationMode.test)
    base = reference(name)  # same tokenizer, other validator: loading tekken.json twice costs seconds
    validator = get_validator(base.version, ValidationMode(mode))
    return MistralTokenizer(base.instruct_tokenizer, validator, base._instruct_request_normalizer)


@cache
def hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_folder(name))


@cache
def ours(name: str):
    from quantkit.tokenizer.chat import ChatTokenizer

    return ChatTokenizer.from_folder(converted_folder(name))


def reference_encode(name: str, messages: list[dict], tools: list[dict] | None = None, mode: str = "test"):
    """mistral-common's encode_chat_completion for an OpenAI-format chat."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(messages, tools)
    return reference(name, mode).encode_chat_completion(request)


# ---- images -------------------------------------------------------------------------------------------------


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, hard edges and some noise: exercises the resize kernel, not just flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 127.5 + 127.5 * np.sin(x / 7.0 + y / 11.0)
    img = np.stack([r, g, b], axis=-1)
    img[(x // 23 + y // 17) % 2 == 0] *= 0.6
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@cache
def image_file(width: int, height: int, mode: str = "RGB", fmt: str = "PNG") -> Path:
    """An odd-sized test image on disk; modes RGB, RGBA (partly transparent), L, P; formats PNG or JPEG."""
    seed = width * 7919 + height
    img = Image.fromarray(_pattern(width, height, seed))
    if mode == "RGBA":
        alpha = np.full((height, width), 255, np.uint8)
        alpha[: height // 2, : width // 3] = 0
        alpha[height // 2 :, width // 2 :] = 90
        img.putalpha(Image.fromarray(alpha))
    elif mode in ("L", "P"):
        img = img.convert(mode)
    folder = _ROOT / "images"
    folder.mkdir(exist_ok=True)
    path = folder / f"img_{width}x{height}_{mode}.{fmt.lower()}"
    img.save(path, format=fmt)
    return path


def file_uri(path: Path) -> str:
    return path.resolve().as_uri()


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern(width, height, 1)).save(buf, format="PNG")
    return buf.getvalue()


def img(width: int, height: int, mode: str = "RGB", fmt: str = "PNG", uri: str = "file") -> dict:
    path = image_file(width, height, mode, fmt)
    return {"type": "image_url", "image_url": {"url": data_uri(path) if uri == "data" else file_uri(path)}}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


# ---- the conversation corpus --------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    messages: list[dict]
    tools: list[dict] | None = None
    mode: str = "test"  # mistral-common validation mode that accepts the case
    hf: bool = True  # the HF chat template can reproduce it (see module docstring)
    images: int = field(init=False)

    def __post_init__(self):
        parts = [p for m in self.messages if isinstance(m.get("content"), list) for p in m["content"]]
        self.images = sum(p.get("type") == "image_url" for p in parts)


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content=None, calls=None) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def system(content) -> dict:
    return {"role": "system", "content": content}


def call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(call_id: str, content) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _args(**kwargs) -> str:
    return json.dumps(kwargs, ensure_ascii=False)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "web-search_v2",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "Requête"}}},
    },
}

LANGUAGES = {
    "en": ("What is the capital of France? Answer in one sentence.", "The capital of France is Paris."),
    "fr": ("Quelle est la capitale de l'Allemagne ? Réponds brièvement.", "C'est Berlin, évidemment !"),
    "de": ("Wie heißt die Hauptstadt von Österreich? Grüße aus Köln.", "Die Hauptstadt ist Wien."),
    "es": ("¿Cuál es la capital de España? ¡Gracias, señor!", "La capital de España es Madrid."),
    "it": ("Qual è la capitale d'Italia? Perché è famosa?", "È Roma, città eterna."),
    "pt": ("Qual é a capital do Brasil? Não sei ao certo.", "A capital do Brasil é Brasília."),
    "zh": ("中国的首都是哪里？请用一句话回答。", "中国的首都是北京。"),
    "ja": ("日本の首都はどこですか？簡単に答えてください。", "日本の首都は東京です。"),
    "ru": ("Какая столица России? Ответь кратко, пожалуйста.", "Столица России — Москва."),
    "ko": ("한국의 수도는 어디입니까? 짧게 대답해 주세요.", "한국의 수도는 서울입니다."),
}

CODE = 'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n\tif n < 2:\n        return n\n'
CODE_REPLY = "```python\nfor i in range(10):\n    print(fib(i))  # 0 1 1 2 ...\n```\n"


def text_cases() -> list[Case]:
    """Conversations every tokenizer version accepts (text only, no tools)."""
    cases = [Case(f"lang-{code}", [user(q)]) for code, (q, _) in LANGUAGES.items()]
    cases += [
        Case("multilingual-turns", [user(LANGUAGES["fr"][0]), assistant(LANGUAGES["fr"][1]), user(LANGUAGES["ja"][0])]),
        Case("multi-turn-4", [user("Hi!"), assistant("Hello."), user("2+2?"), assistant("4"), user("Thanks")]),
        Case("system", [system("You are a pirate. Always answer in pirate speak."), user("Where is the treasure?")]),
        Case(
            "system-multi-turn",
            [system("Be concise."), user(LANGUAGES["de"][0]), assistant(LANGUAGES["de"][1]), user("Und Ungarn?")],
        ),
        Case("two-system", [system("Rule one."), system("Rule two."), user("Go.")]),
        Case("system-between-users", [user("First."), system("Mid-chat instruction."), user("Second.")]),
        Case(
            "leading-trailing-spaces", [user("   padded question   "), assistant("  answer with spaces  "), user(" x")]
        ),
        Case("only-spaces", [user("   ")]),
        Case("empty-user", [user("")]),
        Case("newlines", [user("\n\nline one\n\n\nline two\n"), assistant("ok\n\n"), user("\r\nwindows\r\n")]),
        Case("tabs-and-nbsp", [user("\tindented\u00a0non-breaking\u2009thin  double  space")]),
        Case("code", [user("Explain this:\n" + CODE), assistant(CODE_REPLY), user("Now in Rust?")]),
        Case("json-text", [user('Parse {"a": [1, 2.5e3, null], "b": "x\\ny"} please')]),
        Case("digits", [user("Compute 1234567 * 89 = ? and 3.14159 - 0.001 = ?")]),
        Case("emoji-and-symbols", [user("I ❤️ 🦀 and ∑x² ≥ 0; ﬁne ligature; zero\u200bwidth")]),
        Case("text-parts", [user([text("part one"), text("part two")])]),
        Case("empty-text-part", [user([text(""), text("only this")])]),
        Case("consecutive-assistant", [user("Q"), assistant("A1"), assistant("A2"), user("Q2")]),
        Case("assistant-first", [assistant("I start."), user("Then me.")]),
        Case("ends-with-assistant", [user("Say hi"), assistant("Hi there!")], mode="finetuning"),
        Case("long", [user(" ".join(f"word{i}" for i in range(300)))]),
        Case("special-strings-in-text", [user("Print [INST] and </s> and <s> literally")], hf=False),
        Case("reference-tokens", [user("cite [REF] doc [/REF] and [REFERENCE_DOC_3]")]),
    ]
    return cases


def tool_cases() -> list[Case]:
    """Tool definitions, calls and results (v3 and v7)."""
    c1 = call("a1B2c3D4e", "get_weather", _args(city="Paris"))
    c2 = call("Zz9Yy8Xx7", "get_weather", _args(city="東京", unit="C"))
    return [
        Case("tools-defined", [user("Weather in Paris?")], [WEATHER, SEARCH]),
        Case(
            "tool-call-and-result",
            [user("Weather in Paris?"), assistant(None, [c1]), tool("a1B2c3D4e", '{"temp": 21}')],
            [WEATHER],
        ),
        Case(
            "tool-result-then-answer",
            [
                user("Weather?"),
                assistant(None, [c1]),
                tool("a1B2c3D4e", '{"temp": 21, "sky": "clear"}'),
                assistant("It is 21 °C and clear."),
                user("And Tokyo?"),
            ],
            [WEATHER],
        ),
        Case(
            "parallel-calls",
            [
                user("Paris and Tokyo?"),
                assistant(None, [c1, c2]),
                tool("a1B2c3D4e", '{"temp": 21}'),
                tool("Zz9Yy8Xx7", '{"temp": 30, "note": "湿度が高い"}'),
            ],
            [WEATHER],
        ),
        Case(
            "tool-result-plain-text",
            [user("w?"), assistant(None, [c1]), tool("a1B2c3D4e", "Sunny, 21 degrees")],
            [WEATHER],
        ),
        Case(
            "tool-args-dict",
            [
                user("w?"),
                assistant(None, [call("k9K9k9K9k", "get_weather", {"city": "Zürich"})]),
                tool("k9K9k9K9k", '{"temp": -3}'),
            ],
            [WEATHER],
        ),
        Case(
            "tools-and-system",
            [
                system("Use tools when needed."),
                user("Search the news"),
                assistant(None, [call("s1s2s3s4s", "web-search_v2", _args(query="news"))]),
                tool("s1s2s3s4s", '["a", "b"]'),
                user("Summarize"),
            ],
            [WEATHER, SEARCH],
        ),
        Case("tool-result-number", [user("n?"), assistant(None, [c1]), tool("a1B2c3D4e", "42")], [WEATHER], hf=False),
        Case(
            "tool-args-compact-json",
            [
                user("w?"),
                assistant(None, [call("c0c0c0c0c", "get_weather", '{"city":"Oslo"}')]),
                tool("c0c0c0c0c", '{"temp":1}'),
            ],
            [WEATHER],
            hf=False,
        ),
    ]


def image_cases() -> list[Case]:
    """Images of odd sizes, some larger than 1024 px, 1 to 3 per conversation (multimodal tokenizers)."""
    return [
        Case("image-then-text", [user([img(37, 53), text("What is in this image?")])]),
        Case("text-then-image", [user([text("Describe:"), img(640, 481)])]),
        Case("image-only", [user([img(100, 17)])]),
        Case("image-large-wide", [user([text("Too wide:"), img(1500, 703, fmt="JPEG")])]),
        Case("image-large-tall", [user([img(333, 2049, mode="RGBA"), text("Tall one with transparency")])]),
        Case(
            "three-images",
            [
                user(
                    [
                        text("Compare"),
                        img(64, 64),
                        text("with"),
                        img(1025, 1025, mode="L"),
                        text("and"),
                        img(250, 120, mode="P", uri="data"),
                    ]
                )
            ],
        ),
        Case(
            "image-multi-turn",
            [
                system("You see images."),
                user([img(200, 300), text("What colour?")]),
                assistant("Mostly red."),
                user([text("And this?"), img(1200, 90)]),
            ],
        ),
        Case("image-data-uri", [user([img(48, 80, uri="data"), text("data URI image")])]),
    ]


def cases_for(name: str) -> list[Case]:
    version = VERSION[name]
    cases = text_cases()
    if version != "v1":
        cases += tool_cases()
    if version == "v7":
        c1 = call("a1B2c3D4e", "get_weather", _args(city="Lyon"))
        cases += [
            Case(
                "content-and-call", [user("w?"), assistant("Let me check.", [c1]), tool("a1B2c3D4e", "rain")], [WEATHER]
            ),
            Case("tool-result-empty", [user("w?"), assistant(None, [c1]), tool("a1B2c3D4e", "")], [WEATHER]),
        ]
    if name in MULTIMODAL:
        cases += image_cases()
    return cases


_REFERENCE_CACHE: dict[tuple[str, str], object] = {}


def reference_case(name: str, case: Case):
    """reference_encode for a corpus case, computed once (several tests compare against it)."""
    key = (name, case.id)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = reference_encode(name, case.messages, case.tools, case.mode)
    return _REFERENCE_CACHE[key]
