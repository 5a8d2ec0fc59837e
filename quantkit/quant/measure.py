"""Measurement for --bpw: the output error of every candidate quantization of every block, on float inputs.

A block is a layer's attention (q, k, v, o) or its MLP (gate, up, down; for MoE every expert's w1, w3, w2 take
the same option). Each candidate sets per role a bit layout (uniform, or the most salient input columns in act
order one width up) and a group size; the table below spans ~2.0 to ~8.3 bits per weight, and its low end
favours the roles that are known to be sensitive (v, o, down), as in ExLlamaV2's tables. For each candidate the
block's linears are solved with GPTQ on Hessians captured from the float layer, and the error is
||y_q - y_f||_F / ||y_f||_F of the block output including the residual stream; the cost is the exact number of
stored bits (codes, scales, zeros, permutation, segment table, rotation signs).
The candidates and their stored bits come from the output format (formats/: GPTQ's are what GPTQ loaders run).
Errors are read on the first ERROR_ROWS rows; each linear is solved once per distinct setting, from one
factorization of its Hessian. Each block is also probed at PROBE_BITS: its output with only that block quantized
goes to the caller, which carries it to the logits (quant/pipeline.py `measure`), so that the allocator can weigh
local errors by what they cost the model end to end (allocate.py `predicted_kl`). A format with a `reach` measures
the candidates that store at most that many bits per weight above the target (the quantkit format's 2.5: 13 of 19
at 3.0), which the allocation chooses from, so one measurement serves every --bpw target up to its own
(--measure-for raises it); the others measure their whole table. One with a `reach_below` (EXL3) also leaves out
the linears narrower than that below the target, so its measurement serves targets from its own up (--measure-for
below the target lowers that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantkit.arch.blocks import BLOCK_ROLES, block_of, expert_index, role_of
from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import get_format
from quantkit.formats.spec import PER_CHANNEL, Candidate, LinearSpec, QuantSettings, Segments
from quantkit.memory import release
from quantkit.quant.capture import (
    LayerIO,
    attach_hessians,
    capture_groups,
    grid_kind,
    shared_expert_hessians,
    solve_linear_widths,
)
from quantkit.quant.estimate import MeasureWork
from quantkit.quant.gptq import HessianAccumulator
from quantkit.quant.solvers import SOLVERS

CANDIDATES_VERSION = 4  # 4: end-to-end probes (measurement.json "probe"; 2, 3 and 4 bits until 2026-12-06)
# Room for a block's solved weights: SOLVE_BYTES, or SOLVE_CACHE times the block's own weights where that is more. A
# linear's settings that share a grid kind are solved in one GPTQ pass, as many as the room holds for every linear of
# the block (fewer passes and no re-solves after evictions: a SmolLM2-135M layer measured in 0.78-0.90x the time of 4
# a pass, the same errors); a large model's blocks take SOLVE_CACHE (4) a pass.
SOLVE_CACHE, SOLVE_BYTES = 4, 1 << 30
# Rows a candidate's block output error is read on (the Hessians use every measurement row): 1 since 2026-12-07 (2
# before; with the probes' 64 tokens, MEASURE_CLIP and the quantkit format's reach, 0.61x that format's measurement
# time; benchmarks/RESULTS.md "A cheaper measurement, second round").
ERROR_ROWS = 1
# Each block's probe streams: the first tokens of the first rows. One row's KL is noisy (25% rms in log against 8
# rows' on SmolLM2-135M), and the allocation follows the noise: KL of --bpw 3.0 (GPTQ) 1.295 / 1.249 / 1.216 with
# 1 / 4 / 8 rows of 128 tokens. 4 rows at one probe width are 4 streams per block; 64 tokens each since 2026-12-07.
PROBE_ROWS, PROBE_TOKENS = 4, 64
# The uniform width each block is probed at; the square law (allocate.predicted_kl) carries it to the other widths.
# On the self-trained model, allocations for 3.0 / 4.0 / 4.16 / 4.25 read from 2-bit probes measured KL 1.00 / 0.84 /
# 0.94 / 0.95x those read from 3-bit probes and 1.00 / 0.84 / 0.79 / 0.69x those from 4-bit probes.
PROBE_BITS = (2,)
# The measurement's clipping search: every 16th shrink, refined to 4 steps (9 tries where the run's search takes 16;
# gptq.CLIP_SEARCH). It was 27% of a quantkit-format measurement of SmolLM2-135M; the errors measured with it
# differ from the full search's by 2-9% rms per candidate, their mean within 2% (benchmarks/RESULTS.md).
MEASURE_CLIP = (16, 4)
LAST_ROLES = ("o", "down")  # a dense half-layer's last linear: x + o_proj(attention), h + down_proj(act)


def measure_work(
    fmt: OutputFormat | str, rows: int, head: tuple[int, int], layer: dict[str, tuple[int, int]], s: QuantSettings,
    moe: bool = False, reach: float | None = None, floor: float | None = None,
) -> MeasureWork:
    """What measure_layer and the probes do for this format on `rows` measurement rows, for the --dry-run estimate
    (layer: a decoder layer's linear shapes; reach, floor: the measurement's window, floor_for and reach_for)."""
    fmt = get_format(fmt)
    cands = {b: [c for c, _ in block_table(fmt, b, moe and b == "mlp", layer, s, lambda n: None, reach, floor)]
             for b in BLOCK_ROLES}  # fmt: skip
    last = {b: next(r for r in BLOCK_ROLES[b] if r in LAST_ROLES) for b in BLOCK_ROLES}
    shared = {b: not (moe and b == "mlp") for b in BLOCK_ROLES}  # the last-linear shortcut of dense halves
    return MeasureWork(
        rows=rows,
        error_rows=min(rows, ERROR_ROWS),
        candidates={b: len(cs) for b, cs in cands.items()},
        settings={b: {r: len({c.for_role(r) for c in cs}) for r in BLOCK_ROLES[b]} for b, cs in cands.items()},
        fronts={
            b: len({tuple(x for x in c.roles if x[0] != last[b]) for c in cs}) if shared[b] else len(cs)
            for b, cs in cands.items()
        },  # fmt: skip
        last={b: last[b] if shared[b] else "" for b in BLOCK_ROLES},
        probes=len(PROBE_BITS) * min(PROBE_ROWS, rows),
        probe_tokens=PROBE_TOKENS,
        head=head,
    )


def covers(reach: float | None, needed: float | None, floor: float | None = None, needed_floor: float | None = None
           ) -> bool:  # fmt: skip
    """Whether a measurement of the candidates up to `reach` (and down to `floor`) holds every one up to `needed`
    (and down to `needed_floor`; None: all)."""
    high = reach is None or (needed is not None and needed <= reach)
    return high and (floor is None or (needed_floor is not None and needed_floor >= floor))


def floor_for(fmt: OutputFormat | str, target: float | None) -> float | None:
    """The narrowest width a --bpw target measures and chooses per linear (OutputFormat.floor_for), never above the
    probe width: the allocation reads every block's probed candidate."""
    floor = get_format(fmt).floor_for(target)
    return None if floor is None else min(floor, min(PROBE_BITS))


def measured_widths(fmt: OutputFormat | str, target: float) -> list[int]:
    """The widths a --bpw target measures each linear at, in a format with one width per matrix (EXL3's K): each a
    solve of every linear, which the encode benches price."""
    fmt = get_format(fmt)
    floor, reach = floor_for(fmt, target), fmt.reach_for(target)
    return [w for w in fmt.widths if (floor is None or w >= floor) and (reach is None or w <= reach)]


def check_reach(reach: float | None, fmt: OutputFormat | str, target: float | None, what: str,
                floor: float | None = None) -> None:  # fmt: skip
    """Refuse a measurement (what: its name in the message) made for a lower --bpw than target, or for a higher
    one where the format leaves out narrow widths (floor): it lacks candidates target may use."""
    fmt = get_format(fmt)
    if target is not None and not covers(reach, fmt.reach_for(target)):
        made = f"--bpw up to {fmt.target_for(reach):g}" if fmt.reach is not None else f"{reach:g} bits per weight"
        raise QuantkitError(f"{what} was made for {made}, which lacks candidates --bpw {target:g} may use: measure "
                            "again (--measure-for makes a measurement serve every target up to it)")  # fmt: skip
    if target is not None and not covers(None, None, floor, floor_for(fmt, target)):
        raise QuantkitError(f"{what} leaves out linears narrower than {floor:g} bits, which --bpw {target:g} may use: "
                            "measure again (--measure-for makes a measurement serve every target between the run's "
                            "--bpw and it)")  # fmt: skip


def block_table(
    fmt: OutputFormat, block: str, moe: bool, layer: dict[str, tuple[int, int]], s: QuantSettings, rotate_seed,
    reach: float | None = None, floor: float | None = None,
) -> list[tuple[Candidate, int]]:
    """The block's candidates and their exact stored bits, on layer's shapes ({name: (out, in)}); with reach, only
    those a --bpw target measures and chooses from: in a format that mixes widths within a matrix, those that store
    at most reach bits per weight; in one with one width per matrix, those whose every linear is at most reach bits
    wide (each width a linear is measured at costs a solve, an EXL3 trellis encode, which a block's average would
    not bound; and stored bits would count EXL3's padding, 4x on a 64-wide model, against the target); with floor,
    only those whose every linear is at least floor bits wide."""
    names = [n for n in layer if block_of(n) == block]
    numel = sum(layer[n][0] * layer[n][1] for n in names)
    table = []
    for c in fmt.candidates(block, moe):
        specs = [spec_for_candidate(c, n, layer[n][1], s, rotate_seed(n)) for n in names]
        bits = sum(fmt.stored_bits(spec, *layer[n], s) for spec, n in zip(specs, names, strict=True))
        if floor is not None and any(sp.bits < floor for sp in specs):
            continue
        if reach is None or (bits <= reach * numel if fmt.mixed_matrix else all(sp.bits <= reach for sp in specs)):
            table.append((c, bits))
    return table


def layout_for(segments: Segments, in_features: int, group: int | None) -> int | tuple[tuple[int, int], ...]:
    """Fractions -> whole groups of columns: an int for one width, else ((bits, n_cols), ...)."""
    if len(segments) == 1:
        return segments[0][0]
    gs = group or in_features
    n_groups = in_features // gs
    hi = min(max(1, round(segments[0][1] * n_groups)), n_groups - 1) if n_groups > 1 else 0
    if hi == 0:
        return segments[-1][0]
    return ((segments[0][0], hi * gs), (segments[1][0], (n_groups - hi) * gs))


def spec_for_candidate(cand: Candidate, name: str, in_features: int, s: QuantSettings, rotate_seed: int | None):
    """A candidate's spec for one linear. A fixed group (g32) that does not divide in_features takes the run's
    size instead, which does (settings.check_against_model; --group-size auto resolved to it, else none)."""
    segs, g = cand.for_role(role_of(name))
    if g == PER_CHANNEL:
        group = None
    else:
        group = g if g is not None and in_features % g == 0 else s.group_size
    return LinearSpec(layout_for(segs, in_features, group), group, rotate_seed)


def _hessians(layer: nn.Module, io: LayerIO, ctx) -> dict:
    """One float pass: every linear's input Hessian (shared per input site), both halves' outputs written out."""
    rows, read = io.rows, io.read
    accs: dict[str, HessianAccumulator] = {}
    site_of: dict[str, str] = {}
    hooks = []
    for k, group in enumerate(capture_groups(layer)):
        site = lambda name, k=k: f"{k}:{name.rpartition('.')[0]}"  # noqa: E731  (o_proj's input is not q's)
        site_of.update({name: site(name) for name in group})
        group_accs, group_hooks = attach_hessians(layer, group, site)
        accs.update(group_accs)
        hooks += group_hooks
    try:
        with torch.no_grad():
            for r in range(rows):
                h = layer.attn_block(read(r), ctx)
                io.middle.write(r, h)
                io.write_out(r, layer.mlp_block(h))
    finally:
        for hook in hooks:
            hook.remove()
    starved = sorted(
        {e for n, site in site_of.items() if (e := expert_index(n)) is not None and accs[site].total_weight == 0}
    )
    if starved:  # experts no measurement token reached: use every MoE token instead
        for down in (False, True):
            shared = shared_expert_hessians(layer, starved, down, rows, read, ctx)
            for n, site in site_of.items():
                if expert_index(n) in shared and n.endswith(".w2") == down and accs[site].total_weight == 0:
                    accs[site].merge(shared[expert_index(n)])
    return {n: accs[site] for n, site in site_of.items()}


def _shared_hessians(accs: dict[str, HessianAccumulator]) -> dict[str, torch.Tensor]:
    """H per linear; linears that read one input share an accumulator, and so share one H tensor (and its memory)."""
    by_acc: dict[int, torch.Tensor] = {}  # keyed by id: every accumulator stays alive in accs meanwhile
    return {n: by_acc[id(a)] if id(a) in by_acc else by_acc.setdefault(id(a), a.hessian()) for n, a in accs.items()}


def uniform_width(cand: Candidate) -> int | None:
    """b when the candidate stores every role uniformly at b bits with the run's group size, else None."""
    widths = {segs[0][0] if len(segs) == 1 and g is None else None for _, segs, g in cand.roles}
    return widths.pop() if len(widths) == 1 else None


def probe_candidates(candidates: list[Candidate], widths=PROBE_BITS) -> list[Candidate]:
    """The settings a block is probed at end to end: every role uniform at each of widths at the run's group size
    (every format has them)."""
    return [next(c for c in candidates if uniform_width(c) == b) for b in widths]


def _widths_with(
    spec: LinearSpec, wanted: list[LinearSpec], cached: set[LinearSpec], s: QuantSettings, most: int
) -> list[LinearSpec]:
    """spec and the settings after it that a linear's later candidates want with its grid kind and that are not
    cached, up to `most` of them: one GPTQ pass solves them all (gptq_quantize_widths)."""
    same = [sp for sp in wanted[wanted.index(spec) + 1 :] if sp not in cached
            and grid_kind(sp, s) == grid_kind(spec, s)]  # fmt: skip
    return [spec, *same[: most - 1]]


def _solve(fmt: OutputFormat, W: torch.Tensor, H: torch.Tensor, specs: list[LinearSpec], s: QuantSettings, factor):
    """Each spec's solution of one linear: GPTQ solves them in one pass (from one factorization of H, without the
    proxy losses, with MEASURE_CLIP's search); another format's solver (the EXL3 trellis encoder) one by one."""
    if fmt.solver == "gptq":
        return solve_linear_widths(W, H, specs, s, factor, losses=False, clip_search=MEASURE_CLIP)
    return [SOLVERS[fmt.solver](W, H, spec, s) for spec in specs]


def _block_output(layer: nn.Module, block: str, io: LayerIO, r: int, ctx, last: str | None, specs, shared: dict):
    """(quantized, float) output of row r's half-layer. A dense half is x + last(z) (o_proj or down_proj), and
    candidates that differ only in the last linear's setting see the same z: it is kept from the first of them
    (candidates come ordered that way) so the others skip the attention or gate/up. Same result, bit for bit."""
    x, y_f = (io.read(r), io.middle.read(r)) if block == "attn" else (io.middle.read(r), io.read_out(r))
    key = tuple((n, sp) for n, sp in specs.items() if n != last)
    if last is not None and shared["key"] == key and r < len(shared["inputs"]):
        return x + layer.get_submodule(last)(shared["inputs"][r]), y_f
    if shared["key"] != key:
        shared["key"], shared["inputs"] = key, []
    hook = None
    if last is not None and r == len(shared["inputs"]):
        hook = layer.get_submodule(last).register_forward_pre_hook(lambda _, args: shared["inputs"].append(args[0]))
    try:
        y = layer.attn_block(x, ctx) if block == "attn" else layer.mlp_block(x)
    finally:
        if hook is not None:
            hook.remove()
    return y, y_f


def measure_layer(
    layer: nn.Module,
    io: LayerIO,
    ctx,
    s: QuantSettings,
    rotate_seed: Callable[[str], int | None],
    fmt: OutputFormat | str,
    probe: Callable[[str, int, int, torch.Tensor], None] | None = None,
    probe_rows: int = 0,
    reach: float | None = None,
    floor: float | None = None,
) -> dict[str, list[dict]]:
    """{"attn": [...], "mlp": [...]}, one {"candidate", "bits", "error"} per candidate (those within block_table's
    reach and floor), for this layer; io.middle keeps the float attention half's outputs (the MLP half's
    inputs).

    probe(block, k, r, h): for the first probe_rows rows, the layer's output with only this block quantized at its
    k-th PROBE_BITS width (the other half float), which the caller carries to the logits to weigh this block's
    errors."""
    fmt = get_format(fmt)
    accs = _hessians(layer, io, ctx)
    result: dict[str, list[dict]] = {}
    for block in ("attn", "mlp"):
        names = [n for n in accs if block_of(n) == block]
        hessians = _shared_hessians({n: accs.pop(n) for n in names})
        floats = {n: layer.get_submodule(n).weight.data.clone() for n in names}
        result[block] = []
        moe = any(expert_index(n) is not None for n in names)
        shapes = {n: (layer.get_submodule(n).out_features, layer.get_submodule(n).in_features) for n in names}
        table = block_table(fmt, block, moe, shapes, s, rotate_seed, reach, floor)
        candidates = [c for c, _ in table]
        probed = probe_candidates(candidates) if probe is not None else []
        solved: dict[tuple[str, LinearSpec], torch.Tensor] = {}  # candidates share settings per linear: solve once
        block_bytes = sum(w.numel() * w.element_size() for w in floats.values())
        room = max(SOLVE_CACHE * block_bytes, SOLVE_BYTES)
        most = room // block_bytes  # settings per pass: each linear's first pass fits the room with the others'
        factors: dict[tuple[int, int | None], dict] = {}  # one factorization per Hessian and rotation
        last = None if moe else next(n for n in names if role_of(n) in LAST_ROLES)
        shared: dict = {"key": None, "inputs": []}  # the last linear's inputs under the other linears' settings
        wanted = {n: [] for n in names}  # per linear, its distinct settings in the order the candidates want them
        for cand in candidates:
            for n in names:
                spec = spec_for_candidate(cand, n, layer.get_submodule(n).in_features, s, rotate_seed(n))
                if spec not in wanted[n]:
                    wanted[n].append(spec)
        for cand, bits in table:
            specs = {}
            for n in names:
                linear = layer.get_submodule(n)
                spec = specs[n] = spec_for_candidate(cand, n, linear.in_features, s, rotate_seed(n))
                if (n, spec) not in solved:
                    batch = _widths_with(spec, wanted[n], {sp for m, sp in solved if m == n}, s, most)
                    factor = factors.setdefault((id(hessians[n]), spec.rotate_seed), {})
                    results = _solve(fmt, floats[n], hessians[n], batch, s, factor)
                    for sp, res in reversed(list(zip(batch, results, strict=True))):  # spec last: the newest
                        weight = res.weight.to(floats[n].dtype)
                        room -= weight.numel() * weight.element_size()
                        while room < 0 and solved:  # drop the least recently used
                            room += (old := solved.pop(next(iter(solved)))).numel() * old.element_size()
                        solved[n, sp] = weight
                solved[n, spec] = linear.weight.data = solved.pop((n, spec))
            err = ref = 0.0
            n_err, n_probe = min(io.rows, ERROR_ROWS), min(probe_rows, io.rows) if cand in probed else 0
            with torch.no_grad():
                for r in range(max(n_err, n_probe)):
                    y, y_f = _block_output(layer, block, io, r, ctx, last, specs, shared)
                    if r < n_err:
                        err += float((y.float() - y_f.float().to(y.device)).pow(2).sum())
                        ref += float(y_f.float().pow(2).sum())
                    if r < n_probe:
                        probe(block, probed.index(cand), r, layer.mlp_block(y) if block == "attn" else y)
            result[block].append({"candidate": cand.name, "bits": bits, "error": (err / ref) ** 0.5})
        for n in names:
            layer.get_submodule(n).weight.data = floats[n]
        del hessians, floats, solved, factors
        release()
    return result
