"""A resumable quantization job: settings fingerprint, finished layers, and the hidden states between layers; and
the fingerprints that decide whether a job or a measurement may be reused (source, rows, settings).

Layout of the work dir:
  job.json             settings, fingerprint, the job's named `steps` ("embed", "layer.0".."layer.N-1", "head",
                       "vision"), the `done` ones in order, and which hidden-state file is current
  layers/STEP.safetensors  the quantized tensors of each finished step
  hidden-a.bin / hidden-b.bin  ping-pong row stores: layer i reads one and writes the other (in --offload-dir
                       when given, named after the job's fingerprint)

Hidden states are read and written one row at a time with plain file I/O, so they never count against the
process's memory: the OS page cache keeps them in RAM while it has room and spills to the disk beyond that.

Every file is written under a temporary name and renamed, and job.json is replaced last, so a crash or Ctrl-C at
any point leaves the job at its last finished step; rerunning the same command resumes there and, because each
layer is a deterministic function of its inputs, gives byte-identical output. A run holds locks on DST and the
work dir (see io/claim.py), so a second run into either is refused at once. The cleanup deletes job.json before the
layer files, so a kill inside it leaves only files a later run recognizes as stale and removes.
Only the names listed in WORK_FILES are ever deleted from a work dir: a --work-dir that holds other files keeps them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import get_format
from quantkit.formats.spec import QuantSettings
from quantkit.io.claim import Claim, human, identity, os_error_message, remove, size_of
from quantkit.model.load import Checkpoint
from quantkit.quant.measure import CANDIDATES_VERSION
from quantkit.quant.settings import QuantizeOptions

JOB_VERSION = 2  # 1 counted finished steps with one integer; such a work dir is refused (--restart)
# Everything a job writes into its work dir (glob patterns); measurement.json outlives the job, for reuse.
WORK_FILES = ("job.json", "job.json.tmp-*", "layers", "hidden-*.bin", "attn.bin", "measure", "measurement.tmp")


def offload_tag(fp: str, work: Path) -> str:
    """Row-store names in a shared --offload-dir: the job's fingerprint and its work dir, so two jobs with the same
    settings but different work dirs (each holding its own lock) never share a file."""
    return f"{fp}-{hashlib.sha256(str(Path(work).absolute()).encode()).hexdigest()[:8]}"


def default_work_dir(dst: Path) -> Path:
    return Path(dst).parent / f".{Path(dst).name}.quantkit-work"


def _work_entries(work: Path, keep_measurement: bool = True) -> list[Path]:
    patterns = WORK_FILES if keep_measurement else (*WORK_FILES, "measurement.json")
    return sorted({p for pat in patterns for p in Path(work).glob(pat)})


def discard(work: Path) -> int:
    """Delete a job's files (measurement.json too) and the work dir if that empties it; returns bytes freed."""
    work = Path(work)
    if not work.is_dir():
        return 0
    freed = 0
    for p in _work_entries(work, keep_measurement=False):
        freed += size_of(p)
        remove(p)
    if not any(work.iterdir()):
        work.rmdir()
    return freed


def remove_stale(work: Path, log) -> int:
    """A work dir with no job in it (neither job.json nor an unfinished measurement) holds only a killed cleanup's
    leftovers: delete them (measurement.json stays) and say how much was freed."""
    work = Path(work)
    if not work.is_dir() or (work / "job.json").exists() or (work / "measure" / "job.json").exists():
        return 0
    entries = _work_entries(work)
    freed = sum(size_of(p) for p in entries)
    for p in entries:
        remove(p)
    if not any(work.iterdir()):
        work.rmdir()
    if entries:
        log(f"removed {len(entries)} leftover file(s) of a finished or abandoned job in {work} ({human(freed)} freed)")
    return freed


def space_needed(dst: Path, work: Path, offload: Path | None, output: int, rows: int, seq_len: int, dim: int):
    """Bytes a quantize run writes, by folder: the output beside DST, and in the work dir the finished layers (at
    most the output's size) and the hidden-state row stores (two, the attention half's outputs, plus one for
    measurement; float32 at most)."""
    stores = 4 * rows * seq_len * dim * 4
    work = Path(work)
    have = size_of(work) if work.is_dir() else 0
    if offload is None:
        return {Path(dst).parent: output, work: max(0, output + stores - have)}
    return {Path(dst).parent: output, work: max(0, output - have), Path(offload): stores}


@contextmanager
def claimed(dst: Path, work: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold DST and the work dir for a quantize run (a second run is refused at once), after removing what dead
    runs left in the work dir; an OSError inside (a full disk) becomes one line."""
    with Claim(dst, work, log=log):
        remove_stale(work, log)
        try:
            yield
        except OSError as e:
            msg = os_error_message(e, "quantize")
            raise QuantkitError(f"{msg}; {dst} was not written; finished layers stay in {work}") from None


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
    """The work dir of one quantization run: `steps` are named and run in order; the `done` ones are final, and the
    current row store holds the output of the last one that wrote hidden states."""

    def __init__(self, work_dir: Path, settings: dict, steps: list[str], restart: bool = False,
                 offload_dir: Path | None = None):  # fmt: skip
        self.dir = Path(work_dir)
        self.offload_dir = Path(offload_dir) if offload_dir else None
        self.settings = settings
        self.steps = list(steps)
        self.fp = fingerprint(settings)
        state_path = self.dir / "job.json"
        if restart:
            discard(self.dir)
        if state_path.exists():
            self.state = self._resumed(state_path)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            for p in _work_entries(self.dir):  # a killed cleanup's or an older job's leftovers
                if p.name != "measure":  # a finished measurement's job is removed with the main job
                    remove(p)
            self.state = {"version": JOB_VERSION, "fingerprint": self.fp, "settings": settings, "steps": self.steps,
                          "done": [], "current": "a", "info": {}}  # fmt: skip
            self._save_state()
        (self.dir / "layers").mkdir(exist_ok=True)

    def _resumed(self, state_path: Path) -> dict:
        """The saved state, refused when it is unreadable, from an older quantkit, or for other settings."""
        try:
            state = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantkitError(f"{state_path} is corrupt; rerun with --restart to discard the job") from None
        if isinstance(state, dict) and state.get("version") != JOB_VERSION and "fingerprint" in state:
            raise QuantkitError(
                f"work dir {self.dir} holds a job from an older quantkit version (job format "
                f"{state.get('version')}, this one reads {JOB_VERSION}); rerun with --restart to discard it"
            )
        if not isinstance(state, dict) or state.get("fingerprint") != self.fp or state.get("steps") != self.steps:
            old = state.get("settings", {}) if isinstance(state, dict) else {}
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.settings.items() if old.get(k) != v]
            raise QuantkitError(
                f"work dir {self.dir} holds a job with other settings ({'; '.join(diff[:4]) or 'other steps'}); "
                "rerun with the same settings to resume, or add --restart to discard it"
            )
        done = state.get("done")
        if not isinstance(done, list) or done != self.steps[: len(done)]:
            raise QuantkitError(f"{state_path} is corrupt (its finished steps are out of order); rerun with --restart")
        return state

    @property
    def done(self) -> list[str]:
        """The finished steps, in order."""
        return list(self.state["done"])

    def finished(self, step: str) -> bool:
        return step in self.state["done"]

    @property
    def next(self) -> str | None:
        """The first unfinished step (None when the job is complete)."""
        done = len(self.state["done"])
        return self.steps[done] if done < len(self.steps) else None

    def _save_state(self) -> None:
        tmp = self.dir / f"job.json.tmp-{identity()}"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.state, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "job.json")

    def stores(
        self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, name: str = "hidden"
    ) -> tuple[RowStore, RowStore]:
        """(current, next): the store holding the finished layers' output, and the one to write (a killed step
        leaves the current one intact). Stores of other names flip with the hidden states."""
        cur = self.state.get("current", "a")
        nxt = "b" if cur == "a" else "a"
        return self.store(f"{name}-{cur}", rows, row_shape, dtype), self.store(f"{name}-{nxt}", rows, row_shape, dtype)

    def store(self, name: str, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> RowStore:
        """A row store of this job: in the work dir, or in the offload dir under a name unique to the job."""
        if self.offload_dir is None:
            return RowStore(self.dir / f"{name}.bin", rows, row_shape, dtype)
        self.offload_dir.mkdir(parents=True, exist_ok=True)
        return RowStore(
            self.offload_dir / f"quantkit-{offload_tag(self.fp, self.dir)}-{name}.bin", rows, row_shape, dtype
        )

    def step_path(self, step: str) -> Path:
        return self.dir / "layers" / f"{step}.safetensors"

    def finish(self, step: str, tensors: dict[str, torch.Tensor] | None = None, info: dict | None = None,
               wrote_rows: bool = False) -> None:  # fmt: skip
        """Record `step` as finished: save its tensors, flip the row stores when it wrote the next one's input."""
        if step != self.next:
            raise QuantkitError(f"internal: job step {step!r} finished out of order (next is {self.next!r})")
        if tensors is not None:
            tmp = self.step_path(step).with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, self.step_path(step))
        if wrote_rows:
            self.state["current"] = "b" if self.state.get("current", "a") == "a" else "a"
        self.state["done"].append(step)
        if info is not None:
            self.state["info"][step] = info
        self._save_state()

    def cleanup(self) -> None:
        """After a finished run (the output is in place): delete the job's files in an order a kill cannot break.

        The row stores go first (a finished job never reads them again), then job.json ends the job, then its
        layers; a kill at any point leaves either a finished job that reassembles the same output, or no job and
        files a later run recognizes as leftovers (remove_stale)."""
        if self.offload_dir is not None:
            tags = [offload_tag(self.fp, self.dir)]
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # the measurement job's stores too
                measure_fp = json.loads((self.dir / "measure" / "job.json").read_text())["fingerprint"]
                tags.append(offload_tag(measure_fp, self.dir / "measure"))
            for tag in tags:
                for f in self.offload_dir.glob(f"quantkit-{tag}-*.bin"):
                    f.unlink()
        for pattern in ("hidden-*.bin", "attn.bin", "measure"):
            for p in self.dir.glob(pattern):
                remove(p)
        (self.dir / "job.json").unlink(missing_ok=True)
        for p in _work_entries(self.dir):
            remove(p)
        if not any(self.dir.iterdir()):
            self.dir.rmdir()

    def step_files(self) -> list[Path]:
        """The tensor files of the finished steps, in step order."""
        return [p for step in self.state["done"] if (p := self.step_path(step)).is_file()]

    def info(self, step: str) -> dict:
        return self.state["info"].get(step, {})


def source_fingerprint(ckpt: Checkpoint) -> str:
    h = hashlib.sha256((ckpt.folder / "config.json").read_bytes())
    for name, info in sorted(ckpt.index.infos.items()):
        h.update(f"{name}:{info.dtype}:{info.shape}:{info.file.name}:{info.file.stat().st_size}".encode())
    return h.hexdigest()[:16]


def measurement_fingerprint(
    ckpt: Checkpoint, ids: torch.Tensor, s: QuantSettings, rotate: bool, dtype, fmt: OutputFormat | str
) -> dict:
    """What a measurement depends on: the model, the rows, the candidate table and the GPTQ settings (not bits)."""
    fingerprint = {
        "source": source_fingerprint(ckpt),
        "rows": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "candidates": CANDIDATES_VERSION,
        "rotate": rotate,
        "dtype": str(dtype),
        **get_format(fmt).measurement_key(),
        **asdict(s),
    }
    fingerprint.pop("bits")
    return fingerprint


def job_settings(ckpt: Checkpoint, o: QuantizeOptions, ids: torch.Tensor, specs) -> dict:
    """What a quantize job depends on: a rerun with other settings does not resume it."""
    return {
        "source": source_fingerprint(ckpt),
        "format": o.fmt,
        "head_bits": o.head_bits,
        "vision": o.vision,
        "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "dtype": str(o.torch_dtype),
        "strategy": hashlib.sha256(repr(specs).encode()).hexdigest()[:16],
        **asdict(o.settings),
    }
