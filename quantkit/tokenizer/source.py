"""Find and describe a Mistral-native tokenizer file (tekken.json or tokenizer.model.v*).

Convert needs three facts from it before writing anything: the vocabulary size (checked against params.json,
so a Pixtral-12B tokenizer next to Pixtral-Large weights is caught), the special-token ids (image tokens are
never hard-coded), and the kind/version (which chat template applies).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

# mistral-common's ranks for tekken files that carry no special_tokens list (allowed up to v7).
TEKKEN_DEFAULT_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    kind: str  # "tekken" or "spm"
    version: str  # "v1", "v2", "v3", "v7", ... as mistral-common names them
    vocab_size: int
    specials: dict[str, int]  # special/control token string -> id
    multimodal: bool


def find_tokenizer_file(folder: Path) -> Path | None:
    """tekken.json first, then the highest tokenizer.model.v*, then a bare tokenizer.model (v1)."""
    folder = Path(folder)
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    versioned = sorted(folder.glob("tokenizer.model.v*"), key=lambda p: _spm_version(p.name))
    if versioned:
        return versioned[-1]
    if (folder / "tokenizer.model").is_file():
        return folder / "tokenizer.model"
    return None


def _spm_version(name: str) -> tuple[int, str]:
    m = re.search(r"\.v(\d+)(m\d+)?$", name)
    return (int(m.group(1)), m.group(2) or "") if m else (1, "")


def read_tokenizer_info(path: Path) -> TokenizerInfo:
    path = Path(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
            cfg = data["config"]
            n_special = int(cfg["default_num_special_tokens"])
            vocab_size = int(cfg["default_vocab_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise QuantkitError(f"{path.name}: not a valid tekken tokenizer file ({e})") from None
        listed = [t["token_str"] for t in data.get("special_tokens") or []] or list(TEKKEN_DEFAULT_SPECIALS)
        names = listed + [f"<SPECIAL_{i}>" for i in range(len(listed), n_special)]
        mm = bool(data.get("image") or data.get("multimodal"))
        specials = {s: i for i, s in enumerate(names)}
        return TokenizerInfo(path, "tekken", cfg.get("version", "v3"), vocab_size, specials, mm)
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise QuantkitError(f"{path.name}: not a valid sentencepiece model ({e})") from None
    specials = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}
    major, suffix = _spm_version(path.name)
    return TokenizerInfo(path, "spm", f"v{major}", sp.vocab_size(), specials, suffix.startswith("m"))
