"""Find and describe a Mistral-native tokenizer file (tekken.json or tokenizer.model.v*).

Convert needs three facts from it before writing anything: the vocabulary size (checked against params.json,
so a Pixtral-12B tokenizer next to Pixtral-Large weights is caught), the special-token ids (image tokens are
never hard-coded), and the kind/version (which chat template applies).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
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
    patch_size: int = 16  # image settings, only meaningful when multimodal
    max_image_size: int = 1024
    spatial_merge_size: int = 1


def find_tokenizer_file(folder: Path) -> Path | None:
    """tekken.json (or another tekken*.json), then the highest tokenizer.model.v*, then a bare tokenizer.model (v1)."""
    folder = Path(folder)
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    tekkens = sorted(p for p in folder.glob("tekken*.json") if p.is_file())
    if tekkens:
        return tekkens[-1]
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
    """Facts about a tokenizer file; cached while the file is unchanged (tekken.json is 19 MB of JSON)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise QuantkitError(f"cannot read tokenizer file {path} ({e.strerror})") from None
    return _read_tokenizer_info(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_tokenizer_info(path: Path, size: int, mtime_ns: int) -> TokenizerInfo:
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
        image = data.get("image") or data.get("multimodal") or {}
        specials = {s: i for i, s in enumerate(names)}
        return TokenizerInfo(
            path,
            "tekken",
            cfg.get("version", "v3"),
            vocab_size,
            specials,
            bool(image),
            int(image.get("image_patch_size", 16)),
            int(image.get("max_image_size", 1024)),
            int(image.get("spatial_merge_size", 1)),
        )
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise QuantkitError(f"{path.name}: not a valid sentencepiece model ({e})") from None
    specials = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)}
    major, suffix = _spm_version(path.name)
    # m1, the only multimodal spm version, is patch 16 / longest edge 1024 (mistral-common MultiModalVersion.m1).
    return TokenizerInfo(path, "spm", f"v{major}", sp.vocab_size(), specials, suffix.startswith("m"))


def check_against_params(info: TokenizerInfo, params: dict) -> None:
    """Fail early when the tokenizer cannot belong to these weights (e.g. Pixtral-12B's tekken next to
    Pixtral-Large): the vocabulary sizes differ, or params.json's image token ids are not the tokenizer's."""
    expected = params.get("vocab_size")
    if expected is not None and int(expected) != info.vocab_size:
        raise QuantkitError(
            f"{info.path.name} has {info.vocab_size} tokens but params.json says vocab_size={expected}: "
            "this tokenizer does not belong to these weights"
        )
    vision = params.get("vision_encoder")
    if not vision:
        return
    if not info.multimodal:
        raise QuantkitError(f"params.json has a vision encoder but {info.path.name} has no image support")
    for key, token in (
        ("image_token_id", "[IMG]"),
        ("image_break_token_id", "[IMG_BREAK]"),
        ("image_end_token_id", "[IMG_END]"),
    ):
        if key in vision and int(vision[key]) != info.specials.get(token):
            raise QuantkitError(
                f"params.json {key}={vision[key]} but {info.path.name} has {token}={info.specials.get(token)}: "
                "this tokenizer does not belong to these weights"
            )
