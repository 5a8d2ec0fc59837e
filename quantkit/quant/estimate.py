"""The expected time of a quantize run (--dry-run): the work counted from the model's shapes, at rates measured here.

Work: every capture pass runs the calibration rows through every decoder layer (2 FLOPs per weight per token, plus
attention), feeds one Hessian per input site (2·tokens·in² FLOPs), and GPTQ solves every linear (a Cholesky
factorization and inverse, ~in³ FLOPs, the lazy-batch updates, ~2·out·in² FLOPs, and a Python step per column);
--bpw first measures (MeasureWork, as measure.py does it): one float pass over --measure-rows rows with its Hessians,
one factorization per linear and one solve per distinct setting, each candidate's half-layer output on the error rows
(the part before o/down once per distinct setting of it), and the probe streams carried through the later layers
to the head. Rates: a timed matmul and Cholesky on the
device (the matmul at the shape of one calibration row through a projection, capped), two timed small GPTQ solves
(per-column and per-element cost), a timed tiny op (per-op overhead), a timed fsync (the row stores sync every row
they write) and a timed garbage collection (the run frees memory after every solve), all taken on the spot in about
a second. It is an estimate: reading the checkpoint, writing the output and the vision tower are not counted.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.formats.exl3 import padded
from quantkit.formats.spec import QuantSettings
from quantkit.memory import frozen_heap
from quantkit.quant.gptq import gptq_quantize

OPS_PER_LAYER_FORWARD = 40  # torch ops in one decoder layer's forward on one row (norms, projections, rope, sdpa, …)


@dataclass(frozen=True)
class Rates:
    """What this device does per second, measured just now."""

    matmul: float  # FLOP/s, in the run's dtype
    cholesky: float  # FLOP/s, float32
    column: float  # seconds per GPTQ column, besides the per-element work
    element: float  # seconds per weight per column step (the rank-1 update inside a block)
    op: float  # seconds per small torch op
    fsync: float  # seconds per row written (write + fsync)
    collect: float  # seconds per release() (a full garbage collection in this process)
    trellis: float = 0.0  # seconds per weight of a trellis-coded solve (--format exl3's Viterbi), else 0


def _timed(fn: Callable[[], object], device: str, repeat: int = 3) -> float:
    """Best-of-`repeat` seconds of fn() after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device != "cpu":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(
    device: str, dtype: torch.dtype, s: QuantSettings, row: tuple[int, int, int], trellis_k: int | None = None
) -> Rates:
    """Time a matmul of row = (tokens, in, out), a Cholesky, two small GPTQ solves under s, a tiny op, an fsync and a
    garbage collection on this device; with trellis_k, the trellis encoding of a band of tiles at that K too (a
    band as wide as the row's output: the batch the encoder works on)."""
    m, k, n = row[0], min(row[1], 4096), min(row[2], 4096)
    band = n // 16  # tiles in a band of the widest output: one batch of the trellis encoder, at most
    while 2 * m * k * n > (2e9 if device == "cpu" else 1e11) and m > 16:
        m //= 2
    a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    matmul = 2 * m * k * n / _timed(lambda: a @ b, device)
    m = 512 if device == "cpu" else 2048
    x = torch.randn(m, m, device=device)
    spd = x @ x.T + m * torch.eye(m, device=device)
    cholesky = (m**3 / 3) / _timed(lambda: torch.linalg.cholesky(spd), device)
    k = 256
    h = torch.randn(4 * k, k, device=device)
    hess = h.T @ h
    settings = dict(group_size=min(s.group_size or k, k), sym=s.sym_for(s.bits), act_order=s.act_order,
                    static_groups=s.static_groups, clip=s.clip)  # fmt: skip
    narrow, wide = (_timed(lambda o=o: gptq_quantize(torch.randn(o, k, device=device), hess, 4, **settings), device, 1)
                    for o in (32, 512))  # fmt: skip
    element = max(wide - narrow, 0.0) / ((512 - 32) * k * 64)  # a rank-1 update covers ~64 columns on average
    column = max(narrow / k - 32 * 64 * element, 1e-7)
    tiny = torch.randn(8, 8, device=device)
    op = _timed(lambda: [tiny @ tiny for _ in range(100)], device) / 100
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "row.bin")
        row = bytes(64 * 1024)

        def write_row() -> None:
            with open(path, "wb") as f:
                f.write(row)
                f.flush()
                os.fsync(f.fileno())

        fsync = _timed(write_row, "cpu")
    with frozen_heap():  # as the run collects: inside frozen_heap, so only what it allocates is scanned
        collect = _timed(gc.collect, "cpu", 1)
    trellis_rate = 0.0
    if trellis_k is not None:
        from quantkit.quant.trellis import batch_tiles, encode

        tiles = torch.randn(min(band, batch_tiles(trellis_k)), 256, device=device)
        trellis_rate = _timed(lambda: encode(tiles, trellis_k), device, 1) / tiles.numel()
    return Rates(matmul, cholesky, column, element, op, fsync, collect, trellis_rate)


@dataclass(frozen=True)
class MeasureWork:
    """What the --bpw measurement does (measure.py), per block kind ("attn", "mlp")."""

    rows: int  # measurement rows: one float pass and the Hessians
    error_rows: int  # rows each candidate's output error is read on
    candidates: dict[str, int]  # candidates per block
    settings: dict[str, dict[str, int]]  # per block, per role: distinct settings (one solve each)
    fronts: dict[str, int]  # per block: distinct settings of the roles before the last linear (o, down)
    last: dict[str, str]  # per block: the last linear's role
    probes: int  # probe streams per block (widths x rows)
    probe_tokens: int
    head: tuple[int, int]  # (vocab, dim): every probe stream ends in the head


def factor_seconds(in_f: int, r: Rates) -> float:
    """One factorization of a linear's damped Hessian (Cholesky and a triangular inverse, ~in³ FLOPs as counted)."""
    return (4 / 3) * in_f**3 / r.cholesky


def solve_seconds(out_f: int, in_f: int, r: Rates, block: int = 128, factor: bool = True) -> float:
    """One GPTQ solve of a [out_f, in_f] linear: factorization (unless cached), block updates, per-column steps."""
    update = 2 * out_f * in_f**2 / r.matmul
    if r.trellis:  # the trellis solver: its band updates, and the Viterbi over every weight and the scale search's
        from quantkit.quant.trellis import search_weights

        coded = padded(out_f) * padded(in_f) + search_weights(out_f, in_f)
        return (factor_seconds(in_f, r) if factor else 0.0) + update + coded * r.trellis
    columns = in_f * r.column + out_f * in_f * min(block, in_f) / 2 * r.element
    return (factor_seconds(in_f, r) if factor else 0.0) + update + columns


def layer_pass_seconds(rows: int, seq_len: int, params: int, attn_dim: int, r: Rates, part: float = 1.0) -> float:
    """All rows once through one decoder layer (or `part` of it, reading only): projections, causal attention,
    per-op overhead and, for a whole pass, the synced write of each output row."""
    tokens = rows * seq_len
    flops = 2 * tokens * params + 2 * tokens * seq_len * attn_dim  # QKᵀ and AV, causal: half of 4·T²·d
    return flops / r.matmul + rows * (part * OPS_PER_LAYER_FORWARD * r.op + (r.fsync if part == 1.0 else 0.0))


def estimate_seconds(
    shapes: list[dict[str, tuple[int, int]]],
    groups: list[list[str]],
    *,
    rows: int,
    seq_len: int,
    attn_dim: int,
    rates: Rates,
    head: tuple[int, int] | None = None,
    measure: MeasureWork | None = None,
    block_of: Callable[[str], str] | None = None,
    role_of: Callable[[str], str] | None = None,
) -> float:
    """Seconds for the decoder (and the head when given): per layer, len(groups) capture passes and one output pass,
    the Hessians and one solve per linear; with measure, first the measurement (MeasureWork)."""
    total = 0.0
    for li, layer in enumerate(shapes):
        params = sum(o * i for o, i in layer.values())
        sites = {(g, name.rpartition(".")[0]): layer[name][1] for g, grp in enumerate(groups) for name in grp}
        hessian_per_token = sum(2 * in_f**2 for in_f in sites.values()) / rates.matmul
        total += (len(groups) + 1) * layer_pass_seconds(rows, seq_len, params, attn_dim, rates)
        total += rows * seq_len * hessian_per_token + sum(solve_seconds(o, i, rates) for o, i in layer.values())
        total += (len(sites) + 1) * rates.collect
        if measure is not None:
            total += _measure_layer_seconds(layer, len(shapes) - 1 - li, measure, seq_len, attn_dim, params,
                                            hessian_per_token, rates, block_of, role_of)  # fmt: skip
    if measure is not None:
        vocab, dim = measure.head
        streams = 2 * len(shapes) * measure.probes
        total += streams * (2 * measure.probe_tokens * vocab * dim / rates.matmul + 4 * rates.op)
    if head is not None:
        vocab_rows, dim = head
        total += 2 * rows * seq_len * dim**2 / rates.matmul + solve_seconds(vocab_rows, dim, rates) + 2 * rates.collect
    return total


def _measure_layer_seconds(layer, later: int, m: MeasureWork, seq_len, attn_dim, params, hessian_per_token, rates,
                           block_of, role_of) -> float:  # fmt: skip
    """One layer's share of the measurement; later: the layers after it, which its probe streams go through."""
    total = layer_pass_seconds(m.rows, seq_len, params, attn_dim, rates)
    total += m.rows * seq_len * hessian_per_token + 2 * rates.collect
    for block, n in m.candidates.items():
        names = [name for name in layer if block_of(name) == block]
        roles = {name: role_of(name) for name in names}
        for name in names:
            o, i = layer[name]
            total += factor_seconds(i, rates)
            total += m.settings[block].get(roles[name], 1) * solve_seconds(o, i, rates, factor=False)
        last = sum(o * i for name, (o, i) in layer.items() if name in roles and roles[name] == m.last[block])
        front = sum(o * i for name, (o, i) in layer.items() if name in roles) - last
        attn = attn_dim if block == "attn" else 0
        total += layer_pass_seconds(m.error_rows, seq_len, m.fronts[block] * front, attn * m.fronts[block], rates, 0.5)
        total += layer_pass_seconds(m.error_rows, seq_len, n * last, 0, rates, 0.5)
    # this layer's probe streams (a row of probe_tokens tokens each) go on through every later layer
    total += 2 * m.probes * later * layer_pass_seconds(1, m.probe_tokens, params, attn_dim, rates)
    return total


def human_seconds(t: float) -> str:
    if t < 90:
        return f"{t:.0f} s"
    if t < 5400:
        return f"{t / 60:.0f} min"
    if t < 2 * 86400:
        return f"{t / 3600:.1f} h"
    return f"{t / 86400:,.0f} days"


# At 1 FLOP/s and no overheads, estimate_seconds counts the matmul and factorization FLOPs.
COUNT_FLOPS = Rates(matmul=1.0, cholesky=1.0, column=0.0, element=0.0, op=0.0, fsync=0.0, collect=0.0)
