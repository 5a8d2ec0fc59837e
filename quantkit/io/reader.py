"""Lazy safetensors reading: parse headers without touching tensor data, then load one tensor at a time.

We parse the header ourselves (it is 8 bytes of length + JSON) so that a plan can be made from metadata alone,
a truncated or corrupt file is caught before any work starts, and each tensor is read with a plain `readinto`
into its own buffer: memory stays bounded by the tensor being processed, never by the file or the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; raise a one-line error for truncated or corrupt files."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantkitError(f"{path.name}: corrupt safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER, size - 8):
            raise QuantkitError(f"{path.name}: corrupt or truncated safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QuantkitError(f"{path.name}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, h in header.items():
        try:
            dtype, shape, (s, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QuantkitError(f"{path.name}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise QuantkitError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype}")
        if e - s != math.prod(shape) * dtype_size(dtype) or s < 0:
            raise QuantkitError(f"{path.name}: corrupt safetensors header (bad byte range for {name!r})")
        infos[name] = TensorInfo(name, dtype, shape, path, base + s, base + e)
        data_end = max(data_end, e)
    if base + data_end > size:
        raise QuantkitError(
            f"{path.name}: truncated safetensors file ({size} bytes on disk, header needs {base + data_end})"
        )
    return infos, meta


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer (no mmap, so resident memory is just this tensor)."""
    buf = bytearray(info.nbytes)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            k = f.readinto(view[got:])
            if not k:
                raise QuantkitError(f"{info.file.name}: truncated while reading {info.name!r}")
            got += k
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)


class TensorIndex:
    """All tensors of a checkpoint across its safetensors files, by name; loads lazily."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for f in self.files:
            infos, meta = read_header(f)
            self.metadata[f] = meta
            for name, info in infos.items():
                if name in self.infos:
                    raise QuantkitError(f"tensor {name!r} appears in both {self.infos[name].file.name} and {f.name}")
                self.infos[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def get(self, name: str) -> torch.Tensor:
        return load_tensor(self.infos[name])

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def folder_size(path: Path) -> int:
    """Bytes on disk of every regular file under path."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
