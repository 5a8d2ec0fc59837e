"""A resumable quantization job: settings fingerprint, finished layers, and the hidden states between layers.

Layout of the work dir:
  job.json             settings, fingerprint, `done` (layers finished) and which hidden-state file is current
  layers/NNNN.safetensors  the quantized tensors of each finished layer
  hidden-a.bin / hidden-b.bin  ping-pong row stores: layer i reads one and writes the other (in --offload-dir
                       when given, named after the job's fingerprint)

Hidden states are read and written one row at a time with plain file I/O, so they never count against the
process's memory: the OS page cache keeps them in RAM while it has room and spills to the disk beyond that.

Every file is written under a temporary name and renamed, and job.json is replaced last, so a crash or Ctrl-C at
any point leaves the job at its last finished layer; rerunning the same command resumes there and, because each
layer is a deterministic function of its inputs, gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError

JOB_VERSION = 1


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class RowStore:
    """Hidden states [rows, seq, dim] in one flat file, read and written row by row (no mmap, bounded RSS)."""

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.rows, self.row_shape, self.dtype = Path(path), rows, tuple(row_shape), dtype
        self.row_bytes = torch.empty(self.row_shape, dtype=dtype).nbytes
        if not self.path.exists() or self.path.stat().st_size != rows * self.row_bytes:
            with open(self.path, "wb") as f:
                f.truncate(rows * self.row_bytes)

    def read(self, i: int) -> torch.Tensor:
        buf = bytearray(self.row_bytes)
        with open(self.path, "rb") as f:
            f.seek(i * self.row_bytes)
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=self.dtype).view(self.row_shape)

    def write(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        if tuple(t.shape) != self.row_shape:
            raise QuantkitError(f"internal: hidden row shape {tuple(t.shape)} != {self.row_shape}")
        with open(self.path, "r+b") as f:
            f.seek(i * self.row_bytes)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())


class Job:
    """The work dir of one quantization run; `done` layers are final, `current` holds their output."""

    def __init__(self, work_dir: Path, settings: dict, restart: bool = False, offload_dir: Path | None = None):
        self.dir = Path(work_dir)
        self.offload_dir = Path(offload_dir) if offload_dir else None
        self.settings = settings
        self.fp = fingerprint(settings)
        state_path = self.dir / "job.json"
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except json.JSONDecodeError:
                raise QuantkitError(f"{state_path} is corrupt; rerun with --restart to discard the job") from None
            if state.get("fingerprint") != self.fp:
                old = state.get("settings", {})
                diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
                raise QuantkitError(
                    f"work dir {self.dir} holds a job with other settings ({'; '.join(diff[:4])}); "
                    "rerun with the same settings to resume, or add --restart to discard it"
                )
            self.state = state
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state = {"version": JOB_VERSION, "fingerprint": self.fp, "settings": settings, "done": -1}
            self._save_state()
        (self.dir / "layers").mkdir(exist_ok=True)

    @property
    def done(self) -> int:
        """Number of finished layers (-1 before the embeddings were computed)."""
        return int(self.state["done"])

    def _save_state(self) -> None:
        tmp = self.dir / "job.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.dir / "job.json")

    def stores(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[RowStore, RowStore]:
        """(current, next): the store holding the finished layers' output, and the one to write."""
        cur = self.state.get("current", "a")
        nxt = "b" if cur == "a" else "a"
        return self.store(f"hidden-{cur}", rows, row_shape, dtype), self.store(f"hidden-{nxt}", rows, row_shape, dtype)

    def store(self, name: str, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> RowStore:
        """A row store of this job: in the work dir, or in the offload dir under a name unique to the job."""
        if self.offload_dir is None:
            return RowStore(self.dir / f"{name}.bin", rows, row_shape, dtype)
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        return RowStore(self.offload_dir / f"quantkit-{self.fp}-{name}.bin", rows, row_shape, dtype)

    def layer_path(self, i: int) -> Path:
        return self.dir / "layers" / f"{i:04d}.safetensors"

    def finish(self, done: int, tensors: dict[str, torch.Tensor] | None = None, info: dict | None = None) -> None:
        """Record `done` finished layers: save the last one's tensors, flip the hidden-state stores."""
        if tensors is not None:
            tmp = self.layer_path(done - 1).with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, self.layer_path(done - 1))
        if done >= 0:
            self.state["current"] = "b" if self.state.get("current", "a") == "a" else "a"
        self.state["done"] = done
        if info is not None:
            self.state.setdefault("layers", {})[str(done - 1)] = info
        self._save_state()

    def cleanup(self, keep: tuple[str, ...] = ("measurement.json",)) -> None:
        """After a finished run: delete the hidden states and layer files (the output holds the result)."""
        if self.offload_dir is not None:
            for f in self.offload_dir.glob(f"quantkit-{self.fp}-*.bin"):
                f.unlink()
        for p in self.dir.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.layer_path(i)))

    def layer_info(self, i: int) -> dict:
        return self.state.get("layers", {}).get(str(i), {})
