"""HubTokenizer: a Hugging Face folder's own tokenizer (tokenizer.json + its chat template), for folders that ship
no Mistral-native tokenizer file (community fine-tunes, Llama-family models such as SmolLM2).

It offers what ChatTokenizer offers (encode_chat, encode_raw, encode_text, decode, BOS/EOS ids), with
transformers' behaviour as the reference: text goes through the `tokenizers` library with tokenizer.json as is,
and the chat template (chat_template.jinja, else tokenizer_config.json's) is rendered the way
`apply_chat_template(..., add_generation_prompt=True)` renders it (a sandboxed Jinja environment with trim_blocks,
lstrip_blocks, loop controls, transformers' `tojson`, `raise_exception` and `strftime_now`, the special tokens as
variables), then tokenized without adding special tokens. Mistral-native files take priority where both exist
(ChatTokenizer.from_folder), since mistral-common is the truth for Mistral's own formats.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.tokenizer.encoded import Encoded
from quantkit.tokenizer.source import TokenizerInfo


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path.name}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_str(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (transformers 5 writes it) before tokenizer_config.json's chat_template; a list of
    named templates gives its "default"."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)  # fmt: skip
    return template if isinstance(template, str) else None


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in transformers' sandbox (chat templates from the hub are untrusted code)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise QuantkitError(f"the chat template does not parse ({e})") from None


class HubTokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise QuantkitError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        self.template = _template(folder, config)
        self.special_tokens = {k: s for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if (s := _token_str(config.get(k))) is not None}  # fmt: skip
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
        if isinstance(extra, list):
            self.special_tokens["additional_special_tokens"] = [t for t in map(_token_str, extra) if t]
        added = self.backend.get_added_tokens_decoder()
        specials = {t.content: i for i, t in added.items() if t.special}
        self._bos = self._id(self.special_tokens.get("bos_token"), generation.get("bos_token_id"))
        self._eos = self._id(self.special_tokens.get("eos_token"), generation.get("eos_token_id"))
        ends = generation.get("eos_token_id")
        self.stop_ids = {self._eos, *(e for e in (ends if isinstance(ends, list) else [ends]) if isinstance(e, int))}
        self.stop_ids.discard(None)
        self.add_bos = bool(config.get("add_bos_token", False))
        vocab = self.backend.get_vocab_size(with_added_tokens=True)
        self.info = TokenizerInfo(path, "hf", "hf", vocab, specials, multimodal=False)

    def _id(self, token: str | None, fallback) -> int | None:
        """A special token's id from its string, else generation_config.json's id (the first of a list)."""
        if token is not None and (i := self.backend.token_to_id(token)) is not None:
            return i
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) else None

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def bos_id(self) -> int:
        """BOS, or EOS for models that define none (used only to warm the GPU up)."""
        return self._bos if self._bos is not None else self.eos_id

    @property
    def eos_id(self) -> int:
        if self._eos is None:
            raise QuantkitError(f"{self.info.path.parent.name}: the tokenizer names no eos_token")
        return self._eos

    image_token_id = image_break_id = image_end_id = None

    def encode_text(self, text: str) -> list[int]:
        """Text as tokenizer.json encodes it, without the post-processor's special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """A plain-text prompt as transformers' `tokenizer(text)` encodes it: the post-processor's special tokens
        (BOS for most Llama tokenizers), plus BOS where tokenizer_config.json asks for it and it is not there yet."""
        ids = self.backend.encode(text, add_special_tokens=True).ids
        if self.add_bos and self._bos is not None and ids[:1] != [self._bos]:
            ids = [self._bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, base_dir: Path | None = None
    ) -> Encoded:
        """The conversation through the folder's chat template with the generation prompt, as transformers'
        apply_chat_template tokenizes it. Images are refused: this tokenizer has no image support."""
        import jinja2

        if self.template is None:
            raise QuantkitError(f"{self.info.path.parent.name} has no chat template: use a raw prompt (--raw)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise QuantkitError("messages must be a list of objects with a 'role'")
        for m in messages:
            content = m.get("content")
            if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ("image", "image_url")
                                                 for p in content):  # fmt: skip
                raise QuantkitError(f"{self.info.path.parent.name}'s tokenizer takes no images")
        try:
            text = _compile(self.template).render(
                messages=messages, tools=tools or None, documents=None, add_generation_prompt=True,
                **self.special_tokens,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise QuantkitError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            why = f"{type(e).__name__}: {e}"
            raise QuantkitError(f"the chat template cannot render this conversation ({why})") from None
        return Encoded(self.encode_text(text), [], text)
