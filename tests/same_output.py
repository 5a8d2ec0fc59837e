"""Byte-identity of two output folders, with a failure message a person can read (not two dumps of a shard)."""

from __future__ import annotations

import os
from pathlib import Path

# Subprocesses that must reproduce each other's bytes run on one thread: float sums over threads depend on how
# the work is split, so two runs only agree bit for bit when nothing about the split can vary.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def one_thread_env() -> dict[str, str]:
    """os.environ with the project on PYTHONPATH and one compute thread, for byte-identity subprocesses."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **ONE_THREAD_ENV}


def assert_same_files(expected: Path, actual: Path, pattern: str = "*") -> None:
    """Every file of `expected` (matching pattern) exists in `actual` with the same bytes; a differing shard names
    its tensors."""
    expected, actual = Path(expected), Path(actual)
    names = sorted(p.name for p in expected.glob(pattern) if p.is_file())
    missing = [n for n in names if not (actual / n).is_file()]
    assert not missing, f"{actual} lacks {missing}"
    for name in names:
        a, b = (expected / name).read_bytes(), (actual / name).read_bytes()
        if a == b:
            continue
        detail = _tensor_diff(expected / name, actual / name) if name.endswith(".safetensors") else ""
        raise AssertionError(f"{name} differs ({len(a)} vs {len(b)} bytes){detail}")


def _tensor_diff(a: Path, b: Path) -> str:
    """Which tensors differ between two shards, and by how many elements."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return f": tensor names differ ({sorted(ta.keys() ^ tb.keys())[:5]})"
    diffs = []
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            diffs.append(f"{k} {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}")
        elif not torch.equal(x, y):
            diffs.append(f"{k}: {int((x != y).sum())} of {x.numel()} elements")
    return ": " + ("; ".join(diffs[:6]) if diffs else "same tensors, different header bytes")
