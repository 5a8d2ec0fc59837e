"""Launch configurations of the dequant-matmul kernels, kept as JSON per GPU model (configs/*.json).

A file is named after the GPU (torch.cuda.get_device_name, lower case, non-alphanumerics -> "-", e.g.
`nvidia-h100-80gb-hbm3.json`) and overrides `default.json` key by key. Each path holds a list of entries sorted by
`max_m` (null = any M); the first entry with M ≤ max_m is used. `quantkit.kernels.autotune` writes these files.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
PATHS = ("skinny", "tiled")


def device_slug(name: str) -> str:
    """File stem for a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def load_config(device_name: str | None = None) -> dict:
    """default.json, overridden by the file of device_name when there is one."""
    cfg = json.loads((CONFIG_DIR / "default.json").read_text())
    if device_name:
        path = CONFIG_DIR / f"{device_slug(device_name)}.json"
        if path.exists():
            cfg.update(json.loads(path.read_text()))
    return cfg


def pick(cfg: dict, m: int, path: str | None = None) -> tuple[str, dict]:
    """(path, launch entry) for M rows: skinny up to cfg['skinny_max_m'] rows, tiled above, unless path is given."""
    path = path or ("skinny" if m <= cfg["skinny_max_m"] else "tiled")
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r} (expected one of {', '.join(PATHS)})")
    for entry in cfg[path]:
        if entry.get("max_m") is None or m <= entry["max_m"]:
            return path, entry
    return path, cfg[path][-1]


BUCKETS = {"skinny": [1, 16], "tiled": [256, 2048]}


def candidates(path: str, m: int) -> list[dict]:
    """Launch configs worth timing for M rows on a path."""
    unpack = ("reshape", "index")
    if path == "skinny":
        split = dict(split_k="auto")
        if m == 1:  # GEMV: (BLOCK_N, BLOCK_K, unpack, warps, programs per SM)
            grid = itertools.product((64, 128, 256), (32, 64, 128), unpack, (2, 4), (2, 4, 8))
            return [
                dict(BLOCK_M=1, BLOCK_N=n, BLOCK_K=k, unpack=u, num_warps=w, programs_per_sm=p, num_stages=2, **split)
                for n, k, u, w, p in grid
            ]
        grid = itertools.product((32, 64, 128), (64, 128), unpack, (4, 8), (2, 4))  # ... programs per SM, stages
        return [
            dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, unpack=u, num_warps=4, programs_per_sm=p, num_stages=s, **split)
            for n, k, u, p, s in grid
        ]
    grid = itertools.product((64, 128), (64, 128, 256), (64,), unpack, (4, 8), (3, 4))
    return [
        dict(BLOCK_M=bm, BLOCK_N=n, BLOCK_K=k, split_k=1, unpack=u, num_warps=w, num_stages=s)
        for bm, n, k, u, w, s in grid
        if bm * n <= 128 * 128
    ]
