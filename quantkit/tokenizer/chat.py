"""ChatTokenizer: OpenAI-format conversations -> token ids, image tensors and the prompt as text.

The one code path for the runtime and `quantkit tokenize`. It reads the native tokenizer file that
write_tokenizer_files copies into a converted folder and reproduces mistral-common's encode_chat_completion
without importing it: each text chunk goes through sentencepiece itself (spm) or a byte-level BPE built from
tekken.json, and special and image token ids come from the tokenizer file, never from constants.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError
from quantkit.tokenizer.backend import build_tekken
from quantkit.tokenizer.conversation import parse_messages, parse_tools, rules_for
from quantkit.tokenizer.encoded import Encoded
from quantkit.tokenizer.image import image_token_ids, preprocess_image
from quantkit.tokenizer.render import render
from quantkit.tokenizer.source import TokenizerInfo, find_tokenizer_file, read_tokenizer_info

if TYPE_CHECKING:
    from quantkit.tokenizer.hub import HubTokenizer


@lru_cache(maxsize=2)
def _tekken_encoder(path: str, size: int, mtime_ns: int):
    """Building the BPE from tekken.json takes seconds; reuse it while the file is unchanged."""
    return build_tekken(Path(path), None)


class ChatTokenizer:
    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.rules = rules_for(info.version, info.multimodal)
        self._space = " " if info.kind == "spm" else ""  # how a chunk's dummy prefix shows in `text`
        if info.kind == "spm":
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(info.path))
        else:
            stat = info.path.stat()
            self._bpe = _tekken_encoder(str(info.path.resolve()), stat.st_size, stat.st_mtime_ns)
        if info.multimodal and None in (self.image_token_id, self.image_break_id, self.image_end_id):
            raise QuantkitError(f"{info.path.name} supports images but lacks [IMG], [IMG_BREAK] or [IMG_END]")

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTokenizer | HubTokenizer:
        """The native tokenizer file (tekken.json / tokenizer.model.v*) of a converted or native folder; else the
        folder's tokenizer.json and chat template (a HubTokenizer, same interface), as hub folders ship them."""
        folder = Path(folder)
        if not folder.is_dir():
            raise QuantkitError(f"model folder not found: {folder}")
        path = find_tokenizer_file(folder)
        if path is not None:
            return cls(read_tokenizer_info(path))
        if (folder / "tokenizer.json").is_file():
            from quantkit.tokenizer.hub import HubTokenizer

            return HubTokenizer(folder)
        raise QuantkitError(f"no tokenizer in {folder} (expected tekken.json, tokenizer.model.v* or tokenizer.json)")

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def bos_id(self) -> int:
        return self.info.specials["<s>"]

    @property
    def eos_id(self) -> int:
        return self.info.specials["</s>"]

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end an answer."""
        return {self.eos_id}

    @property
    def image_token_id(self) -> int | None:
        return self.info.specials.get("[IMG]") if self.info.multimodal else None

    @property
    def image_break_id(self) -> int | None:
        return self.info.specials.get("[IMG_BREAK]") if self.info.multimodal else None

    @property
    def image_end_id(self) -> int | None:
        return self.info.specials.get("[IMG_END]") if self.info.multimodal else None

    def encode_text(self, text: str) -> list[int]:
        """One text chunk as mistral-common encodes it (no BOS; special-token strings stay plain text)."""
        if self.info.kind == "spm":
            return self._sp.encode(text)
        return self._bpe.encode(text, add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        """A plain-text prompt or document: BOS, then the text (mistral-common's encode with bos=True)."""
        return [self.bos_id, *self.encode_text(text)]

    def decode(self, ids: list[int]) -> str:
        """Text of the ids with special tokens left out (mistral-common's default policy)."""
        if self.info.kind == "spm":
            return self._sp.decode(list(ids))
        n = len(self.info.specials)
        groups = groupby(ids, key=lambda i: i < n)
        return "".join(self._bpe.decode(list(g), skip_special_tokens=False) for special, g in groups if not special)

    def encode_chat(
        self, messages: list[dict], tools: list[dict] | None = None, base_dir: Path | None = None
    ) -> Encoded:
        """Tokenize a conversation; image paths are relative to base_dir. Bad input raises QuantkitError."""
        parsed = parse_messages(messages, self.rules, base_dir)
        segments = render(parsed, parse_tools(tools, self.rules), self.info.version)
        ids: list[int] = []
        images: list[torch.Tensor] = []
        text: list[str] = []
        for kind, value in segments:
            if kind == "special":
                ids.append(self.info.specials[value])
                text.append(value)
            elif kind == "text":
                ids += self.encode_text(value)
                text.append(self._space + value if value else "")
            else:
                ids += self._image(value, images)
                text.append("[IMG]")
        return Encoded(ids, images, "".join(text))

    def _image(self, image, images: list[torch.Tensor]) -> list[int]:
        patch = self.info.patch_size * self.info.spatial_merge_size
        pixels = preprocess_image(image, patch, self.info.max_image_size)
        images.append(pixels)
        rows, columns = pixels.shape[1] // patch, pixels.shape[2] // patch
        return image_token_ids(columns, rows, self.image_token_id, self.image_break_id, self.image_end_id)
