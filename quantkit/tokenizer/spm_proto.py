"""Read the pieces of a sentencepiece model file without protobuf.

sentencepiece's Python API cannot tell user-defined pieces (`[REF]`, matched anywhere in text) from normal
ones, and the protobuf package is not a runtime dependency, so this reads the three fields we need straight
from the wire format: ModelProto.pieces (field 1) = SentencePiece{piece: 1, score: 2, type: 3}.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Piece:
    piece: str
    score: float
    type: int


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) for one message; value is bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def read_pieces(path: Path) -> list[Piece]:
    """All pieces in id order."""
    try:
        pieces = []
        for field, wire, value in _fields(Path(path).read_bytes()):
            if field != 1 or wire != 2:
                continue
            text, score, kind = "", 0.0, NORMAL
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    text = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append(Piece(text, score, kind))
    except (IndexError, ValueError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{Path(path).name}: not a valid sentencepiece model ({e})") from None
    if not pieces:
        raise QuantkitError(f"{Path(path).name}: no pieces in sentencepiece model")
    return pieces
