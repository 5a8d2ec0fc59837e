"""Allocation for --bpw: one candidate per block minimizing the predicted end-to-end loss under an exact bit budget.

The loss of a candidate is predicted from two measurements (measure.py): its local error (the block's relative
output error on float inputs) and the block's probe, the KL divergence at the model's logits with only that block
quantized uniformly at 2 bits (measure.PROBE_BITS). Local errors alone mislead: a block
whose output is a small change to a large residual stream shows a small relative error however much the model
depends on it. The probe scales each block's errors: KL = probe KL x (error / probe error)^2, the square law of a
small perturbation of the logits, read at each candidate's error; blocks add up (independent perturbations). On
SmolLM2-135M the 60 blocks' measured slopes between their 2- and 3-bit probes averaged 1.98 (sd 0.34, about what
4 probe rows' noise explains), and `--bpw 3.0` built from the 2-bit probe alone measured KL 1.249 (GPTQ format) /
1.154 (quantkit format) against 1.200 / 1.262 from both probes' curve, for half the probes' cost.

The budget is target_bpw × (number of decoder linear weights), and costs are the exact stored bits of each candidate
(codes, scales, zeros, permutations, segment tables, rotation signs). The choice is a knapsack solved by dynamic
programming over the budget left after every block's cheapest candidate, in 20,000 steps (costs rounded up, so the
result never exceeds the budget); it is exact up to that resolution and deterministic. What the candidates'
granularity leaves unspent is then filled one group of columns at a time: a linear's next-most-salient group moves
one width up, in the blocks whose measured error falls fastest per bit, until no such step fits. The realized bpw
therefore lands just under the target, within the smallest such step (one group of columns of one linear).
In a format whose linears cannot mix widths (GPTQ), the fill moves whole blocks to a dearer candidate of their table
instead (one that does not raise the measured error), largest error drop per bit first.

The knapsack chooses among every candidate of the table across widths, up to the format's reach above the target
(OutputFormat.reach: in the quantkit format 2.5 bits per weight, which left SmolLM2's allocations unchanged), and
in EXL3 down to 1.5 below it (reach_below: no K = 1 at 3.0, which SmolLM2's allocation did not choose either).
Until 2026-12-06 every block stayed between the widest uniform width whose build fits the budget (b) and the next
width up: before the probes, a free choice on SmolLM2-135M at uniform 4-bit's size (GPTQ g64) put q/k/v at 8 bits
and o/down at 3 in 17 blocks and measured 37% more KL than uniform 4-bit. With the probes weighing the blocks that
window only cost: on SmolLM2-135M dropping it took the real-model KL from 1.249 / 1.154 to 1.075 / 1.010 at 3.0
(GPTQ / quantkit format), 0.269 to 0.220 at uniform 4-bit's size (GPTQ) and 0.337 to 0.230 at 4.0 (quantkit
format); on the self-trained model it cut the KL at 3.0 and 4.0 to 0.67x and 0.44x (benchmarks/RESULTS.md).
Every target reads the 2-bit probes (measure.PROBE_BITS), so one measurement serves every target its candidates
reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quantkit.arch.blocks import block_of, expert_index
from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import get_format
from quantkit.formats.spec import LinearSpec, QuantSettings
from quantkit.quant.measure import (
    PROBE_BITS,
    block_table,
    check_reach,
    floor_for,
    probe_candidates,
    spec_for_candidate,
)

RESOLUTION = 20_000
BLOCKS = ("attn", "mlp")


@dataclass
class Allocation:
    """The outcome: per layer, per linear (layer-relative name) the spec; the bits it costs; the target."""

    specs: list[dict[str, LinearSpec]]
    bits: int
    numel: int
    target_bpw: float
    choices: list[dict[str, str]]  # per layer: block -> candidate name
    predicted: list[dict[str, float]]  # per layer: block -> the predicted KL of its choice (local error without probe)

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


def _knapsack(costs: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Minimize Σ errors[i][c_i] s.t. Σ costs[i][c_i] <= budget; costs and budget in resolution units."""
    n = len(costs)
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, budget + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(budget + 1, np.inf)
        for c, (cost, err) in enumerate(zip(costs[i], errors[i], strict=True)):
            if cost > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[cost:] = best[: budget + 1 - cost] + err
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = c
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise QuantkitError("internal: no allocation fits the budget")
    picks = []
    for i in reversed(range(n)):
        c = int(choice[i][end])
        picks.append(c)
        end -= costs[i][c]
    return picks[::-1]


def _upgrade(spec: LinearSpec, in_features: int) -> LinearSpec | None:
    """The same linear with its next group of lowest-width columns one width up; None at 8 bits everywhere.

    Uniform b becomes [(b+1, G), (b, K-G)] (the most salient group first), a two-width layout grows its upper
    segment by one group, and a layout whose lower segment is down to its last group becomes uniform b+1.
    """
    g, bits = spec.group_size, spec.bits
    if isinstance(bits, int):
        if bits >= 8:
            return None
        if g is None or in_features <= g:
            return LinearSpec(bits + 1, g, spec.rotate_seed)
        return LinearSpec(((bits + 1, g), (bits, in_features - g)), g, spec.rotate_seed)
    (b_hi, n_hi), (b_lo, n_lo) = bits
    if n_lo <= g:
        return LinearSpec(b_hi, g, spec.rotate_seed)
    return LinearSpec(((b_hi, n_hi + g), (b_lo, n_lo - g)), g, spec.rotate_seed)


def _is_moe(layer: dict, block: str) -> bool:
    return any(expert_index(n) is not None for n in layer if block_of(n) == block)


def _fill_blocks(picks: list[int], bits: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Spend what the knapsack's rounding left: move a block to a dearer candidate that fits and does not raise its
    error, the largest error drop per bit first (then the largest step), until none fits."""
    picks = list(picks)
    left = budget - sum(row[c] for row, c in zip(bits, picks, strict=True))
    while True:
        moves = [
            ((errors[k][c] - errors[k][j]) / (bits[k][j] - bits[k][c]), bits[k][j] - bits[k][c], -k, j)
            for k, c in enumerate(picks)
            for j in range(len(bits[k]))
            if 0 < bits[k][j] - bits[k][c] <= left and errors[k][j] <= errors[k][c]
        ]
        if not moves:
            return picks
        _, delta, k, j = max(moves)
        picks[-k], left = j, left - delta


def _table(shapes: list[dict[str, tuple[int, int]]], s: QuantSettings, rotate_seed, fmt: OutputFormat,
           reach: float | None = None, floor: float | None = None):  # fmt: skip
    """Every block (layer, "attn" / "mlp"), its candidates (up to reach bits per weight, linears at least floor
    bits wide) and their exact stored bits on these shapes: the same costs a measurement records, known before
    measuring."""
    blocks = [(li, b) for li in range(len(shapes)) for b in ("attn", "mlp")]
    cands, bits = [], []
    for li, b in blocks:
        seed = lambda n, li=li: rotate_seed(li, n)  # noqa: E731
        table = block_table(fmt, b, _is_moe(shapes[li], b), shapes[li], s, seed, reach, floor)
        cands.append([c for c, _ in table])
        bits.append([x for _, x in table])
    return blocks, cands, bits


def reachable_bpw(
    shapes: list[dict[str, tuple[int, int]]], s: QuantSettings, rotate_seed, fmt: OutputFormat | str
) -> tuple[float, float]:
    """(lowest, highest) bpw the candidate table reaches on these shapes: every block's cheapest or dearest
    candidate, costed as the measurement records them (so no measurement is needed)."""
    _, _, bits = _table(shapes, s, rotate_seed, get_format(fmt))
    numel = sum(o * i for layer in shapes for o, i in layer.values())
    return sum(min(row) for row in bits) / numel, sum(max(row) for row in bits) / numel


def predicted_kl(errors: list[float], probe: tuple[float, float] | None) -> list[float]:
    """What each candidate of a block costs the model end to end, from its local error and the block's probe
    (local error, KL at the logits): the square law through the probe. Without a usable probe (synthetic tables,
    a zero error or KL) the local errors themselves."""
    if probe is None or probe[0] <= 0 or probe[1] <= 0:
        return list(errors)
    e0, kl0 = probe
    return [kl0 * (e / e0) ** 2 for e in errors]


def _choose(bits: list[list[int]], errors: list[list[float]], budget: int, fill: bool) -> list[int]:
    """One candidate index per block: the knapsack, then (fill) the fill of what its rounding left, by whole blocks."""
    # The knapsack spends only what the cheapest choice of every block leaves over, so that choice always fits
    # (also at the lowest reachable target) and the resolution covers just the range that is being decided.
    floor = [min(row) for row in bits]
    spare = budget - sum(floor)
    if spare > 0:
        unit = spare / RESOLUTION
        costs = [[math.ceil((x - f) / unit) for x in row] for row, f in zip(bits, floor, strict=True)]
        picks = _knapsack(costs, errors, RESOLUTION)
    else:
        picks = [  # nothing to spend: the cheapest candidate of each block (the most accurate among equals)
            min(range(len(row)), key=lambda c, row=row, e=e: (row[c], e[c]))
            for row, e in zip(bits, errors, strict=True)
        ]
    return _fill_blocks(picks, bits, errors, budget) if fill else picks


def allocate(
    measurement: dict,
    shapes: list[dict[str, tuple[int, int]]],
    target_bpw: float,
    s: QuantSettings,
    rotate_seed,
    fmt: OutputFormat | str,
) -> Allocation:
    """Choose every layer's candidates for target_bpw; shapes[i][name] = (out, in) of layer i's linears. A format
    whose matrices hold one width each fills what the knapsack's rounding left with whole block candidates; one
    that mixes widths within a matrix widens single linears instead."""
    fmt = get_format(fmt)
    numel = sum(o * i for layer in shapes for o, i in layer.values())
    check_reach(measurement.get("reach"), fmt, target_bpw, "the measurement", measurement.get("floor"))
    blocks, cands, bits = _table(shapes, s, rotate_seed, fmt, fmt.reach_for(target_bpw), floor_for(fmt, target_bpw))
    lo, hi = sum(min(x) for x in bits) / numel, sum(max(x) for x in bits) / numel
    if not lo <= target_bpw <= hi:
        raise QuantkitError(f"--bpw {target_bpw} is outside what this model can reach: {lo:.3f} to {hi:.3f}")
    budget = int(target_bpw * numel)
    errors = []  # per block, the predicted KL of each candidate
    probe = measurement.get("probe")
    (width,) = PROBE_BITS
    if probe is not None and width not in probe["bits"]:
        raise QuantkitError(f"the measurement has no {width}-bit probes, which --bpw reads (it has {probe['bits']}): "
                            "measure again")  # fmt: skip
    for (li, b), row in zip(blocks, cands, strict=True):
        entries = {e.get("candidate"): e for e in (measurement["layers"][li] or {}).get(b) or [] if isinstance(e, dict)}
        lacking = [c.name for c in row if c.name not in entries]
        if lacking:
            raise QuantkitError(f"the measurement lacks layer {li} {b} candidates ({', '.join(sorted(lacking))}): "
                                "measure again")  # fmt: skip
        point = None
        if probe is not None:
            probed = probe_candidates(row)[0]
            point = (entries[probed.name]["error"], probe["kl"][li][BLOCKS.index(b)][probe["bits"].index(width)])
        errors.append(predicted_kl([entries[c.name]["error"] for c in row], point))
    picks = _choose(bits, errors, budget, fill=not fmt.mixed_matrix)

    specs: list[dict[str, LinearSpec]] = [{} for _ in shapes]
    choices: list[dict[str, str]] = [{} for _ in shapes]
    predicted: list[dict[str, float]] = [{} for _ in shapes]
    slopes = []
    used = 0
    for k, ((li, b), c) in enumerate(zip(blocks, picks, strict=True)):
        cand = cands[k][c]
        choices[li][b] = cand.name
        predicted[li][b] = errors[k][c]
        for name, (o, i) in shapes[li].items():
            if block_of(name) == b:
                specs[li][name] = spec_for_candidate(cand, name, i, s, rotate_seed(li, name))
                used += fmt.stored_bits(specs[li][name], o, i, s)
        dearer = [(x, e) for x, e in zip(bits[k], errors[k], strict=True) if x > bits[k][c]]
        gain = max(((errors[k][c] - e) / (x - bits[k][c]) for x, e in dearer), default=0.0)
        slopes.append((gain, li, b))

    if not fmt.mixed_matrix:
        return Allocation(specs, used, numel, target_bpw, choices, predicted)
    for _gain, li, b in sorted(slopes, key=lambda t: (-t[0], t[1], t[2])):  # fill, steepest blocks first
        names = sorted(n for n in shapes[li] if block_of(n) == b)
        progress = True
        while progress:
            progress = False
            for name in names:
                o, i = shapes[li][name]
                new = _upgrade(specs[li][name], i)
                if new is None:
                    continue
                delta = fmt.stored_bits(new, o, i, s) - fmt.stored_bits(specs[li][name], o, i, s)
                if used + delta <= budget:
                    specs[li][name], used, progress = new, used + delta, True
    return Allocation(specs, used, numel, target_bpw, choices, predicted)
