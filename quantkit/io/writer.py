"""Streamed, sharded safetensors writing.

Shards are planned from names, dtypes and shapes only, so each shard's header is written first and tensors are
then produced and appended one at a time: peak memory is one tensor, whatever the shard size. Each shard is
written under a `.partial` name and renamed when complete, so a crash never leaves a file that looks finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.io.claim import check_space, os_error_message, remove, same_or_inside, temp_name
from quantkit.io.reader import DTYPE_NAMES, dtype_size

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its output name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '1234' -> 1234 (HF's convention: GB is decimal)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise QuantkitError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def parse_shard_size(text: str | int) -> int:
    """--max-shard-size as bytes; 0 would plan one tensor per shard (thousands of files), so it is refused."""
    size = parse_size(text)
    if size < 1:
        raise QuantkitError(f"--max-shard-size must be positive, got {text!r}")
    return size


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most max_bytes; a tensor is never split."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return [s for s in shards if s]


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


def write_shard(
    path: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write one safetensors file, calling produce(spec) for each tensor in order; checks dtype and shape."""
    partial = path.with_name(path.name + ".partial")
    try:
        _write_shard(partial, specs, produce, metadata, on_bytes)
    except OSError as e:
        e.filename = e.filename or str(partial)  # f.write's errors name no file; the one-line message needs it
        raise
    os.replace(partial, path)


def _write_shard(partial: Path, specs, produce, metadata, on_bytes) -> None:
    with open(partial, "wb") as f:
        f.write(_header_bytes(specs, {"format": "pt", **(metadata or {})}))
        for s in specs:
            t = produce(s)
            if DTYPE_NAMES.get(t.dtype) != s.dtype or tuple(t.shape) != s.shape:
                raise QuantkitError(
                    f"internal: {s.name} produced {DTYPE_NAMES.get(t.dtype)} {tuple(t.shape)}, "
                    f"planned {s.dtype} {s.shape}"
                )
            if s.nbytes:
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            if on_bytes:
                on_bytes(s.nbytes)
            del t


def write_sharded(
    folder: Path,
    shards: list[list[TensorSpec]],
    produce: Callable[[TensorSpec], torch.Tensor],
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write planned shards as model-0000i-of-0000N.safetensors plus model.safetensors.index.json."""
    weight_map = {}
    for name, shard in zip(shard_names(len(shards)), shards, strict=True):
        write_shard(folder / name, shard, produce, on_bytes=on_bytes)
        weight_map.update({s.name: name for s in shard})
    write_index(folder, weight_map, sum(s.nbytes for shard in shards for s in shard))


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / INDEX_NAME, data)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _is_previous_output(folder: Path) -> bool:
    """A model folder a run could have written: config.json, safetensors weights and no subfolders."""
    entries = list(folder.iterdir())
    return (
        (folder / "config.json").is_file()
        and any(p.suffix == ".safetensors" for p in entries)
        and not any(p.is_dir() and not p.is_symlink() for p in entries)
    )


class OutputFolder:
    """Assemble an output folder as a hidden temporary sibling and move it into place at the end.

    Refuses a non-empty destination without force, and with force anything but a previous model output (never a
    folder holding the source or the work dir); refuses a destination inside the source and a file system without
    room for `need` bytes. On failure the temporary folder is removed and the destination is left as it was; an
    OSError while writing (a full disk) becomes a one-line error naming the path and the space needed.
    """

    def __init__(
        self, dst: Path, force: bool = False, src: Path | None = None, need: int = 0, work: Path | None = None
    ):
        self.dst = Path(dst).absolute()
        if src is not None:
            if same_or_inside(self.dst, src):
                raise QuantkitError(f"output folder {dst} is inside the source folder {src}; choose another place")
            if same_or_inside(src, self.dst):
                raise QuantkitError(f"output folder {dst} contains the source folder {src}; choose another place")
        if work is not None and same_or_inside(work, self.dst):
            raise QuantkitError(f"output folder {dst} contains the work dir {work}; choose another place")
        if self.dst.exists() and not self.dst.is_dir():
            raise QuantkitError(f"output path {dst} exists and is not a folder")
        if self.dst.is_dir() and any(self.dst.iterdir()):
            if not force:
                raise QuantkitError(f"output folder {dst} is not empty (use --force to replace it)")
            if not _is_previous_output(self.dst):
                raise QuantkitError(
                    f"output folder {dst} does not hold a previous model output (config.json and *.safetensors, no "
                    "subfolders); --force only replaces one: remove it yourself or choose another place"
                )
        parent = self.dst.parent
        if not parent.is_dir():
            raise QuantkitError(f"parent folder {parent} does not exist")
        probe = temp_name(self.dst, "probe")
        try:  # a real probe: permissions, read-only file systems and special folders all show here
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            raise QuantkitError(f"cannot write to {parent} ({e.strerror})") from None
        check_space({parent: need})
        self.need = need
        self.tmp = temp_name(self.dst, "tmp")

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                msg = os_error_message(exc, "output", self.need)
                raise QuantkitError(f"{msg}; nothing was written to {self.dst}") from None
            return
        old = None
        if self.dst.exists() or self.dst.is_symlink():
            old = temp_name(self.dst, "old")
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            remove(old)
