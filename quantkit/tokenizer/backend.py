"""Build `tokenizers` objects that encode text exactly like mistral-common's tokenizers.

Two uses: `tokenizer.json` for transformers (with the control tokens registered as special tokens), and the
runtime's tekken text encoder (without them: mistral-common encodes "[INST]" typed by a user as plain text).
transformers 5's `LlamaTokenizerFast(vocab_file=...)` silently builds an empty tokenizer, so we build the
model ourselves: sentencepiece BPE -> BPE with byte fallback and a metaspace; tekken -> byte-level BPE whose
merges are ordered by the merged token's rank (tiktoken's rule).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from quantkit.errors import QuantkitError
from quantkit.tokenizer.source import TokenizerInfo
from quantkit.tokenizer.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, read_pieces


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_spm(path: Path) -> Tokenizer:
    """tokenizer.json equivalent of a Mistral sentencepiece BPE model (byte fallback, dummy prefix, BOS)."""
    pieces = read_pieces(path)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    # sentencepiece merges the pair whose merged piece has the highest score; scores fall with the id.
    merges = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
        found = [(vocab[a], vocab[b], a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [(-p.score, i, ia, ib, a, b) for ia, ib, a, b in found]
    merges.sort()
    unk = next(p.piece for p in pieces if p.type == UNKNOWN)
    model = models.BPE(
        vocab=vocab,
        merges=[(a, b) for *_, a, b in merges],
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=any(p.type == BYTE for p in pieces),
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = [AddedToken(p.piece, special=True, normalized=False) for p in pieces if p.type in (CONTROL, UNKNOWN)]
    user = [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = pieces[1].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
    )
    return tok


def _tekken_table(path: Path) -> tuple[dict, list[bytes], int]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = data["config"]
        n_special = int(cfg["default_num_special_tokens"])
        inner = int(cfg["default_vocab_size"]) - n_special
        ranked = sorted(data["vocab"], key=lambda t: t["rank"])[:inner]
        tokens = [base64.b64decode(t["token_bytes"]) for t in ranked]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise QuantkitError(f"{Path(path).name}: not a valid tekken tokenizer file ({e})") from None
    return cfg, tokens, n_special


def build_tekken(path: Path, specials: list[str] | None) -> Tokenizer:
    """Byte-level BPE for a tekken.json; `specials` (ids 0..n-1) are registered as special tokens if given."""
    cfg, tokens, n_special = _tekken_table(path)
    b2u = _bytes_to_unicode()
    as_text = ["".join(b2u[b] for b in t) for t in tokens]
    names = specials or [f"<SPECIAL_{i}>" for i in range(n_special)]
    vocab = {name: i for i, name in enumerate(names)}
    vocab.update({s: n_special + r for r, s in enumerate(as_text)})
    if len(vocab) != n_special + len(tokens):
        raise QuantkitError(f"{Path(path).name}: special token strings collide with BPE tokens")
    ranks = {t: r for r, t in enumerate(tokens)}
    merges = []
    for t in tokens:  # in rank order, so merges are ordered by the merged token's rank
        for k in range(1, len(t)):
            a, b = ranks.get(t[:k]), ranks.get(t[k:])
            if a is not None and b is not None:
                merges.append((as_text[a], as_text[b]))
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(cfg["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if specials:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def build_backend(info: TokenizerInfo) -> Tokenizer:
    """The full tokenizer.json tokenizer for a native tokenizer file."""
    if info.kind == "tekken":
        return build_tekken(info.path, sorted(info.specials, key=info.specials.get))
    return build_spm(info.path)
