"""Calibration texts: the bundled default mix, a `datasets` hub name, or local .jsonl/.json/.parquet/.txt files.

A source yields documents, each plain text or a chat conversation (Mistral-style JSON messages with optional tool
definitions). Records are read as: the `text_field` column if present (a string, or a message list), else a
`messages` column (chat), else a one-line error naming the fields that exist. A .txt file is one document, or
several separated by lines that are exactly `<|endofdoc|>` (the bundled files use this).
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from quantkit.errors import QuantkitError

CALIB_DIR_ENV = "QUANTKIT_CALIB_DIR"
DOC_SEPARATOR = "<|endofdoc|>"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
DEFAULT_MIX_NAME = "quantkit-default-mix-v1"
# (file in calib_data/, weight): the share of calibration tokens each file gets.
DEFAULT_MIX = (
    ("chat.jsonl", 0.25),
    ("prose_en.txt", 0.17),
    ("code.txt", 0.175),
    ("lang_fr.txt", 0.045),
    ("lang_de.txt", 0.045),
    ("lang_es.txt", 0.045),
    ("lang_it.txt", 0.045),
    ("lang_pt.txt", 0.045),
    ("lang_zh.txt", 0.045),
    ("lang_ja.txt", 0.045),
    ("lang_ko.txt", 0.045),
    ("lang_ru.txt", 0.045),
)
HUB_MAX_CHARS = 20_000_000  # stop streaming a hub dataset after this much text (≈5M tokens)


@dataclass(frozen=True)
class Document:
    text: str | None = None
    messages: list[dict] | None = None  # [{"role": ..., "content": ..., "tool_calls": [...]}, ...]
    tools: list[dict] | None = None  # function definitions offered to the assistant in this conversation


@dataclass
class Source:
    name: str
    documents: list[Document]
    weight: float = 1.0


@dataclass
class Calibration:
    dataset: str  # DEFAULT_MIX_NAME, a hub name or the local path given
    sources: list[Source]
    split: str | None = None
    text_field: str | None = None
    extra: dict = field(default_factory=dict)  # provenance details (hub config, files read)


def default_calib_dir() -> Path:
    """Bundled calib_data/ (quantkit/calib_data links to it in a checkout), or $QUANTKIT_CALIB_DIR."""
    env = os.environ.get(CALIB_DIR_ENV)
    return Path(env) if env else Path(__file__).parents[1] / "calib_data"


def default_images(root: Path | None = None) -> list[Path]:
    """The bundled calibration images (charts, documents, scenes) for the vision tower, sorted by name."""
    return sorted((root or default_calib_dir()).joinpath("images").glob("*.png"))


def load_calibration(
    dataset: str | None = None,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
    max_chars: int = HUB_MAX_CHARS,
) -> Calibration:
    """Resolve --dataset: None = the default mix; an existing path = local files; anything else = a hub name."""
    if dataset is None or dataset == "default":
        return load_default_mix()
    path = Path(dataset).expanduser()
    if path.exists():
        files = _local_files(path)
        docs = [d for f in files for d in read_local(f, text_field)]
        extra = {"files": [f.name for f in files]}
        calib = Calibration(str(dataset), [Source(path.name, docs)], None, text_field, extra)
    elif path.suffix.lower() in LOCAL_SUFFIXES:
        raise QuantkitError(f"calibration file {dataset} not found")
    else:
        docs = load_hub(dataset, split, text_field, config, max_chars)
        extra = {"config": config} if config else {}
        calib = Calibration(dataset, [Source(dataset, docs)], split, text_field, extra)
    if not calib.sources[0].documents:
        raise QuantkitError(f"calibration dataset {dataset} is empty: no non-empty text or conversation found")
    return calib


def load_default_mix(root: Path | None = None) -> Calibration:
    root = root or default_calib_dir()
    if not root.is_dir():
        raise QuantkitError(f"bundled calibration data not found at {root}; set {CALIB_DIR_ENV} or pass --dataset")
    sources = []
    for name, weight in DEFAULT_MIX:
        if not (root / name).is_file():
            raise QuantkitError(f"bundled calibration file {root / name} is missing")
        sources.append(Source(name, read_local(root / name, "text"), weight))
    return Calibration(DEFAULT_MIX_NAME, sources, extra={"files": [name for name, _ in DEFAULT_MIX]})


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise QuantkitError(f"{path.name}: unsupported calibration file type (use {', '.join(LOCAL_SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise QuantkitError(f"calibration dataset {path} is empty: no {', '.join(LOCAL_SUFFIXES)} files in it")
    return files


def read_local(path: Path, text_field: str = "text") -> list[Document]:
    """Documents of one local file (empty texts are dropped)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            parts = re.split(rf"(?m)^{re.escape(DOC_SEPARATOR)}\r?$", path.read_text(encoding="utf-8"))
            return [Document(text=p.strip("\r\n")) for p in parts if p.strip()]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            columns = [text_field] if text_field in names else [c for c in ("messages", "tools") if c in names]
            if not columns:
                raise _missing_field(path.name, text_field, names)
            records = pq.read_table(path, columns=columns).to_pylist()
        elif suffix == ".jsonl":
            records = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    records.append(_json(line, f"{path.name}:{n}"))
        else:
            records = _json(path.read_text(encoding="utf-8"), path.name)
            if not isinstance(records, list):
                raise QuantkitError(f"{path.name}: expected a JSON list of records")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantkitError(f"cannot read calibration file {path}: {e}") from None
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        if isinstance(e, QuantkitError):
            raise
        raise QuantkitError(f"cannot read calibration file {path}: {e}") from None
    docs = (_record(r, text_field, path.name) for r in records)
    return [d for d in docs if d is not None]


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{where}: invalid JSON ({e.msg})") from None


def _missing_field(where: str, text_field: str, fields) -> QuantkitError:
    names = ", ".join(sorted(fields)) or "none"
    return QuantkitError(f"{where}: no field {text_field!r} in the records (fields: {names}); pass --text-field")


def _record(rec, text_field: str, where: str) -> Document | None:
    """One record -> Document, None when empty; raises when neither text_field nor messages exists."""
    if isinstance(rec, str):
        return Document(text=rec) if rec.strip() else None
    if not isinstance(rec, dict):
        raise QuantkitError(f"{where}: records must be JSON objects, got {type(rec).__name__}")
    if text_field not in rec and "messages" not in rec:
        raise _missing_field(where, text_field, rec)
    value = rec[text_field] if text_field in rec else rec["messages"]
    if value is None:
        return None
    if isinstance(value, str):
        return Document(text=value) if value.strip() else None
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return Document(messages=value, tools=rec.get("tools") or None) if value else None
    raise QuantkitError(f"{where}: field {text_field!r} is neither text nor a list of chat messages")


def _check_hub_reachable(where: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when the hub cannot be reached (datasets would retry for ~40 s, printing a
    warning per try). Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) reads the local cache: no probe."""
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise QuantkitError(
            f"cannot load calibration {where}: the Hugging Face Hub ({host}) is unreachable ({e.strerror or e}); "
            "pass a local .jsonl/.parquet/.txt, or set HF_HUB_OFFLINE=1 to use the local datasets cache"
        ) from None


def load_hub(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, max_chars: int = HUB_MAX_CHARS
) -> list[Document]:
    """Stream a `datasets` hub dataset (or a local dataset folder) until max_chars of text are collected."""
    import datasets

    where = f"dataset {name!r}" + (f" ({config})" if config else "") + f" split {split!r}"
    if not Path(name).exists():
        _check_hub_reachable(where)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        docs, chars = [], 0
        for rec in stream:
            doc = _record(rec, text_field, where)
            if doc is None:
                continue
            docs.append(doc)
            chars += len(doc.text) if doc.text is not None else len(json.dumps(doc.messages))
            if chars >= max_chars:
                break
    except QuantkitError:
        raise
    except Exception as e:  # datasets/hub raise many types (ConnectionError, FileNotFoundError, ValueError, ...)
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise QuantkitError(f"cannot load calibration {where}: {msg}") from None
    return docs
