"""Fixed calibration rows [rows, seq_len] of token ids from a Calibration, deterministic for a given seed.

Each source gets its share of the rows·seq_len token budget (by weight, so even one row mixes every source of the
default mix); its documents are taken in a seeded order, tokenized only as needed, and reused in a new order if the
source is too small (recorded as `passes`). The chosen documents of all sources are shuffled together, concatenated
and cut into rows, so rows cross document boundaries the way packed training batches do.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.calib.sources import Calibration, Document, Source
from quantkit.errors import QuantkitError

Encode = Callable[[str], list[int]]  # text -> ids (add BOS or not, as the model expects at a document start)
EncodeChat = Callable[[list[dict], list[dict] | None], list[int]]  # (messages, tools) -> ids, e.g. mistral-common


@dataclass
class CalibRows:
    ids: torch.Tensor  # [rows, seq_len] int64
    provenance: dict  # for quantization_config.calibration: dataset, rows, seq_len, seed, tokens per source


def chat_as_text(doc: Document) -> str:
    """Plain-text rendering of a conversation, used when no chat encoder is given."""
    parts = []
    for m in doc.messages or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(c.get("text", "") for c in content if isinstance(c, dict))
        if content:
            parts.append(str(content))
        if m.get("tool_calls"):
            parts.append(json.dumps(m["tool_calls"], ensure_ascii=False))
    return "\n\n".join(parts)


def _encode(doc: Document, encode: Encode, encode_chat: EncodeChat | None) -> list[int]:
    if doc.messages is not None:
        return list(encode_chat(doc.messages, doc.tools)) if encode_chat else list(encode(chat_as_text(doc)))
    return list(encode(doc.text or ""))


def _quotas(weights: list[float], total: int) -> list[int]:
    """Split total into integers proportional to weights (largest remainder, ties to the earlier source)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    base = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (base[i] - exact[i], i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def _take(
    src: Source, budget: int, rng: random.Random, encode: Encode, encode_chat: EncodeChat | None
) -> tuple[list[list[int]], dict]:
    """Token lists of src's documents in a seeded order until budget tokens (the last one cut)."""
    cache: dict[int, list[int]] = {}
    pieces, got, passes, used = [], 0, 0, 0
    while got < budget:
        passes += 1
        order = list(range(len(src.documents)))
        rng.shuffle(order)
        progressed = False
        for i in order:
            if i not in cache:
                cache[i] = _encode(src.documents[i], encode, encode_chat)
            ids = cache[i][: budget - got]
            if not ids:
                continue
            pieces.append(ids)
            got += len(ids)
            used += 1
            progressed = True
            if got >= budget:
                break
        if not progressed:
            raise QuantkitError(f"calibration source {src.name} is empty: its documents encode to no tokens")
    return pieces, {"tokens": got, "documents": used, "passes": passes}


def build_rows(
    calib: Calibration,
    encode: Encode,
    rows: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    encode_chat: EncodeChat | None = None,
) -> CalibRows:
    """rows × seq_len token ids mixing calib's sources by weight; chat documents go through encode_chat if given."""
    if rows < 1 or seq_len < 1:
        raise QuantkitError(f"--rows and --seq-len must be at least 1, got {rows} and {seq_len}")
    sources = [s for s in calib.sources if s.documents]
    if not sources:
        raise QuantkitError(f"calibration dataset {calib.dataset} is empty")
    rng = random.Random(seed)
    pieces: list[list[int]] = []
    per_source = {}
    for src, budget in zip(sources, _quotas([s.weight for s in sources], rows * seq_len), strict=True):
        if budget == 0:
            continue
        got, stats = _take(src, budget, rng, encode, encode_chat)
        pieces.extend(got)
        per_source[src.name] = stats
    rng.shuffle(pieces)
    flat = [t for p in pieces for t in p]
    ids = torch.tensor(flat, dtype=torch.int64).reshape(rows, seq_len)
    provenance = {
        "dataset": calib.dataset,
        **({"split": calib.split} if calib.split else {}),
        **({"text_field": calib.text_field} if calib.text_field else {}),
        **calib.extra,
        "rows": rows,
        "seq_len": seq_len,
        "seed": seed,
        "sources": per_source,
    }
    return CalibRows(ids, provenance)


def tokenized_rows(tok, calib: Calibration, rows: int, seq_len: int, seed: int) -> CalibRows:
    """build_rows with a model's tokenizer (ChatTokenizer or HubTokenizer): plain documents as raw prompts (BOS as
    the model expects), chats through its chat template. A hub template may not render the bundled Mistral-format
    tool chats (content None beside tool_calls, say): such a chat is calibrated as its plain text instead."""

    def encode_chat(messages: list[dict], tools: list[dict] | None) -> list[int]:
        try:
            return tok.encode_chat(messages, tools).input_ids
        except QuantkitError:
            if tok.info.kind != "hf":
                raise
            return tok.encode_raw(chat_as_text(Document(messages=messages, tools=tools)))

    return build_rows(calib, encode=tok.encode_raw, rows=rows, seq_len=seq_len, seed=seed, encode_chat=encode_chat)
