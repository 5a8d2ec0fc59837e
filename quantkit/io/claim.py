"""Who owns an output: a lock per destination and per work dir, free-space checks, and what dead runs left behind.

A 124B convert writes ~250 GB and a quantize runs for hours, so two runs into the same place must not interleave,
and a run killed with `kill -9` must not leave hundreds of GB of hidden garbage. Locks are `flock`s on a small
file beside the guarded path (the kernel drops them when the holder dies, so a stale lock is simply taken over);
the file names its holder (pid and process start time) for the error message. Temporary folders carry the same
identity in their names, so a later run can tell a dead run's leftovers from a live one's.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from quantkit.errors import QuantkitError

# What a run planned to write, by folder: for the "space needed" part of a disk-full error.
_planned: dict[str, int] = {}


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def identity() -> str:
    """This process as `PID-START`, used in lock files and temporary folder names."""
    pid = os.getpid()
    return f"{pid}-{_start_ticks(pid) or 0}"


def alive(ident: str) -> bool:
    """Whether the process named by `PID-START` (or just `PID`) still runs."""
    pid_text, _, start = ident.partition("-")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    if start and start != "0":
        now = _start_ticks(pid)
        return now is None or str(now) == start
    return True


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


class Lock:
    """An exclusive, non-blocking lock on `path` (a hidden file); the second taker fails at once naming the holder."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> str | None:
        """Take the lock; returns the identity of a dead previous holder whose lock was taken over, if any."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise QuantkitError(f"cannot write to {self.path.parent} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise QuantkitError(f"cannot lock {self.path} ({e.strerror})") from None
                pid = holder.partition("-")[0] or "unknown"
                raise QuantkitError(
                    f"{self.what} is in use by another quantkit run (pid {pid}); wait for it to finish or stop it"
                ) from None
            try:  # the file may have been unlinked by its releasing holder between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = os.read(fd, 200).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, identity().encode(), 0)
            self.fd = fd
            return previous if previous and previous != identity() else None

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


_LEFTOVER = re.compile(r"\.(tmp|old|probe)-(\d+(?:-\d+)?)(?:-.*)?")


def temp_name(dst: Path, kind: str) -> Path:
    """The hidden sibling of dst a run of this process uses: `.DST.tmp-PID-START` (kind: tmp, old or probe)."""
    return dst.parent / f".{dst.name}.{kind}-{identity()}"


def size_of(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(dst: Path, log: Callable[[str], None]) -> int:
    """Remove the temporary folders dead runs left beside dst (`.DST.tmp-*`, `.old-*`, `.probe-*`); bytes freed."""
    prefix = f".{dst.name}"
    freed, count = 0, 0
    for p in dst.parent.glob(f"{glob.escape(prefix)}.*"):
        m = _LEFTOVER.fullmatch(p.name[len(prefix) :])
        if m is None or alive(m.group(2)):
            continue
        freed += size_of(p)
        count += 1
        remove(p)
    if count:
        log(f"removed {count} temporary folder(s) left by interrupted runs beside {dst} ({human(freed)} freed)")
    return freed


def check_space(needs: dict[Path, int]) -> None:
    """Refuse to start when a file system lacks room for what will be written on it (folders grouped by device)."""
    by_dev: dict[int, tuple[Path, int]] = {}
    for folder, n in needs.items():
        probe = Path(folder).absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        dev = probe.stat().st_dev
        first, total = by_dev.get(dev, (probe, 0))
        by_dev[dev] = (first, total + n)
        _planned[str(Path(folder).absolute())] = n
    for folder, n in by_dev.values():
        free = shutil.disk_usage(folder).free
        if n > free:
            raise QuantkitError(
                f"not enough free space on the file system of {folder}: the run needs {human(n)}, {human(free)} free"
            )


def _existing(folder: Path) -> Path:
    """folder or its nearest existing parent: the run's temporary folder is gone by the time the error is told."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def os_error_message(e: OSError, action: str, need: int | None = None) -> str:
    """One line for an OSError during writing: the path, the reason, and for a full disk the space needed.

    A copy (shutil.copyfile) names its source as filename and the file it writes as filename2: the one written is
    the one to name, and its file system's free space the one to quote."""
    path = e.filename2 or e.filename or "?"
    msg = f"{action} failed writing {path}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        owners = [f for f in _planned if str(path).startswith(f.rstrip("/") + "/")]
        if need is None and owners:
            need = _planned[max(owners, key=len)]
        try:
            free = shutil.disk_usage(_existing(Path(path).parent) if path != "?" else ".").free
        except OSError:
            free = None
        if need is not None:
            msg += f" (the run needs about {human(need)}"
            msg += f"; {human(free)} free now)" if free is not None else ")"
        elif free is not None:
            msg += f" ({human(free)} free now)"
    return msg


def same_or_inside(path: Path, folder: Path) -> bool:
    """Whether path is folder or inside it, after resolving symlinks on both."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


class Claim:
    """Exclusive ownership of an output folder (and optionally a work dir) for one run; a context manager.

    On entry: lock DST (and the work dir), then remove what dead runs left beside DST. On exit: release.
    """

    def __init__(self, dst: Path, work: Path | None = None, log: Callable[[str], None] | None = None):
        self.dst = Path(dst).absolute()
        self.work = Path(work).absolute() if work is not None else None
        self.log = log or (lambda msg: None)
        self.locks: list[Lock] = []

    def __enter__(self) -> Claim:
        if not self.dst.parent.is_dir():
            raise QuantkitError(f"parent folder {self.dst.parent} does not exist")
        targets = [(self.dst, f"output folder {self.dst}")]
        if self.work is not None and self.work.parent.is_dir():
            targets.append((self.work, f"work dir {self.work}"))
        try:
            for path, what in targets:
                lock = Lock(path.parent / f".{path.name}.lock", what)
                dead = lock.acquire()
                self.locks.append(lock)
                if dead:
                    self.log(f"took over the lock on {path} from process {dead.partition('-')[0]}, which is gone")
            remove_leftovers(self.dst, self.log)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

    def __exit__(self, *exc) -> None:
        self.release()
