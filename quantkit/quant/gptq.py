"""GPTQ solver and round-to-nearest baseline: pure functions on tensors, no I/O.

GPTQ (Frantar et al., arXiv 2210.17323) quantizes a linear layer W [out, in] one input column at a time and spreads
each column's rounding error over the not-yet-quantized columns through the inverse Hessian of the layer's inputs,
H = XᵀX. The objective is the output error ‖(W − Q)Xᵀ‖² = tr((W − Q) H (W − Q)ᵀ), which this module reports as
`loss` (on the undamped H) so callers can compare settings.

The grid is the GPTQ checkpoint grid: per (group, output row) an fp32 scale that is exactly representable in fp16
(the checkpoint stores fp16) and an integer zero point; code q ∈ [0, 2^bits − 1] dequantizes to scale · (q − zero).
Symmetric grids use zero = 2^(bits−1). Because the solver quantizes with the fp16-rounded scale, dequantizing the
exported tensors reproduces `GPTQResult.weight` bit for bit.

Mixed bits (EXL2-style): `bits` may be a layout [(bits, n_cols), ...] in quantization order, so with act order the
most salient input columns (largest diag H, quantized first) get the first, typically wider, segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

MIN_SCALE = 1e-7  # scales below this (all-tiny groups) are raised to it; still > 0 after fp16 rounding


@dataclass
class GPTQResult:
    q: torch.Tensor  # [out, in] uint8 codes in 0..2^bits-1, original column order
    scales: torch.Tensor  # [n_groups, out] fp32, each value exactly representable in fp16
    zeros: torch.Tensor  # [n_groups, out] uint8 integer zero points
    g_idx: torch.Tensor  # [in] int32 group of each input column (original order), as GPTQ stores it
    perm: torch.Tensor | None  # [in] int64 act-order permutation: column perm[k] was quantized k-th; None = identity
    weight: torch.Tensor  # [out, in] fp32 dequantized weight, == formats.gptq.dequantize_gptq(q, scales, zeros, g_idx)
    loss: float  # tr((W - Q) H (W - Q)ᵀ) with the undamped H; nan when no H was given or not asked for
    rel_loss: float  # loss / tr(W H Wᵀ)
    damp: float  # damping used, as a fraction of mean(diag H) (raised from the requested one if Cholesky failed)
    dead: int  # input columns whose Hessian diagonal was zero (weight column zeroed)
    bits: int | list[tuple[int, int]]  # an int, or the mixed layout [(bits, n_cols), ...] in quantization order
    group_size: int | None  # None = one group per output row (per-channel)
    sym: bool
    static_groups: bool = False  # groups fixed in original column order before the solve (no permutation stored)


class HessianAccumulator:
    """Accumulates H = Σ w_t x_t x_tᵀ / Σ w_t in fp32 from batches of layer inputs.

    Normalizing by the total weight keeps H's scale independent of the number of calibration tokens (GPTQ uses
    2/N · Σ xxᵀ; the constant does not change the solution because damping is relative to mean(diag H)).
    Weights let callers count tokens unequally, e.g. MoE routing weights or a padding mask.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [in, in]
        self.total_weight = 0.0
        self.tokens = 0  # tokens with a non-zero weight

    def add(self, x: torch.Tensor, weight: float | torch.Tensor | None = None) -> None:
        """Add a batch x [..., in]; weight is None (1 per token), a scalar per token, or a tensor [...] per token."""
        x = x.reshape(-1, self.in_features).to(self.sum.device, torch.float32)  # [n, in]
        if weight is None or not isinstance(weight, torch.Tensor):
            w = 1.0 if weight is None else float(weight)
            if w < 0 or not math.isfinite(w):
                raise QuantkitError(f"Hessian token weight must be finite and >= 0, got {w}")
            if w == 0 or x.shape[0] == 0:
                return
            self.sum.addmm_(x.T, x, alpha=w)
            self.total_weight += w * x.shape[0]
            self.tokens += x.shape[0]
            return
        w = weight.reshape(-1).to(self.sum.device, torch.float32)  # [n]
        if w.shape[0] != x.shape[0]:
            raise QuantkitError(f"Hessian weights have {w.shape[0]} entries for {x.shape[0]} tokens")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise QuantkitError("Hessian token weights must be finite and >= 0")
        xs = x * w.sqrt().unsqueeze(1)  # [n, in]
        self.sum.addmm_(xs.T, xs)
        self.total_weight += float(w.sum())
        self.tokens += int((w > 0).sum())

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's tokens (e.g. a shared Hessian for MoE experts that saw few tokens)."""
        self.sum += other.sum.to(self.sum.device)
        self.total_weight += other.total_weight
        self.tokens += other.tokens

    def hessian(self) -> torch.Tensor:
        """H [in, in] fp32, the weighted mean of x xᵀ."""
        if self.total_weight <= 0:
            raise QuantkitError("no calibration tokens reached this layer: its Hessian is empty")
        return self.sum / self.total_weight


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(tr(E H Eᵀ), tr(E H Eᵀ) / tr(W H Wᵀ)) with E = W − Q: the layer's output error on the calibration inputs."""
    W = W.float()
    H = H.to(W.device, torch.float32)
    E = W - Q.float()  # [out, in]
    loss = float(((E @ H) * E).sum())
    ref = float(((W @ H) * W).sum())
    return loss, (loss / ref if ref > 0 else float("nan"))


def _check_args(W: torch.Tensor, bits: int, group_size: int | None) -> None:
    if W.dim() != 2:
        raise QuantkitError(f"weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise QuantkitError(f"bits must be an integer from 2 to 8, got {bits}")
    if group_size is not None and (group_size <= 0 or W.shape[1] % group_size != 0):
        raise QuantkitError(f"group size {group_size} does not divide in_features {W.shape[1]}")


def column_bits(bits: int | Sequence[tuple[int, int]], n_in: int, group_size: int | None) -> list[int]:
    """Bits of each column in quantization order, from an int or a layout [(bits, n_cols), ...]."""
    if isinstance(bits, int):
        return [bits] * n_in
    layout = [(int(b), int(n)) for b, n in bits]
    if sum(n for _, n in layout) != n_in:
        raise QuantkitError(f"bit layout {layout} covers {sum(n for _, n in layout)} columns, not {n_in}")
    if group_size is None or any(n % group_size for _, n in layout):
        raise QuantkitError(f"mixed bits need segments that are whole groups (group size {group_size}): {layout}")
    for b, _ in layout:
        if not 2 <= b <= 8:
            raise QuantkitError(f"bits must be an integer from 2 to 8, got {b}")
    return [b for b, n in layout for _ in range(n)]


# The clipping search's (coarse stride, finest stride), in steps of its grid (powers of two): every 8th step, then
# around each row's best down to single steps. The --bpw measurement searches (16, 4) (measure.MEASURE_CLIP).
CLIP_SEARCH = (8, 1)
# Elements of the shrinks the clipping search tries at once: 4 MB of fp32 per temporary, which the CPU's caches
# hold. 16 MB ran 1.7x slower on the measurement's stacked widths (SmolLM2's gate_proj at three widths, one
# group: 3 tries a batch instead of all 10), the same codes.
CLIP_BATCH = 1 << 20
MaxQ = int | torch.Tensor  # the largest code: one for all rows, or per row (float [out]) when widths are stacked


def _grid(x: torch.Tensor, maxq: MaxQ, sym: bool, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out] covering the range of x [out, k] (times shrink); the scale is rounded to fp16."""
    lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)  # amin: min(dim) is 25x slower
    return _range_grid(lo * shrink, hi * shrink, maxq, sym)


def _range_grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: MaxQ, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the range [xmin, xmax] (xmin <= 0 <= xmax; any shape whose last dim is the rows)."""
    if sym:
        xmax = torch.maximum(xmax, -xmin)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=MIN_SCALE).half().float()
    if sym:
        middle = float((maxq + 1) // 2) if isinstance(maxq, int) else (maxq + 1) * 0.5  # 2^(b-1), and 6x faster
        return scale, torch.zeros_like(scale) + middle
    zero = _clamp(torch.round(-xmin / scale), maxq)
    # Keep zero >= 1: GPTQ v1 files store zero - 1, and several loaders mis-read a stored -1 (see docs/format.md).
    # Where the range starts at ~0, stretch the step so that code 1 is zero and code maxq still reaches xmax.
    low = zero < 1
    scale = torch.where(low, (xmax / (maxq - 1)).clamp(min=MIN_SCALE).half().float(), scale)
    return scale, torch.where(low, torch.ones_like(zero), zero)


def _clamp(x: torch.Tensor, maxq: MaxQ) -> torch.Tensor:
    return torch.clamp(x, 0, maxq) if isinstance(maxq, int) else torch.minimum(x.clamp(min=0), maxq)


def _quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: MaxQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of x [out, k] (or [out]) on the grid (scale, zero) [out, 1] (or [out]); a
    per-row maxq is [out] (or [out, 1])."""
    q = _clamp(torch.round(x / scale) + zero, maxq)
    return q, scale * (q - zero)


def _dequant_(x: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, hi, out: torch.Tensor | None = None):
    """_quant's dequantized value, scale · clamp(round(x / scale), lo, hi) with lo = −zero and hi = maxq − zero,
    in place (into out, else a new tensor): the same floats, as round(x / scale) + zero and its clamp are exact
    integers; four passes and no temporaries, for the solver's column step and the clipping search."""
    return torch.div(x, scale, out=out).round_().clamp_(lo, hi).mul_(scale)


def _norm_error_(d: torch.Tensor, norm: float) -> torch.Tensor:
    """Σ d^norm over the last dim of d >= 0, overwriting d; 2.5 as d²·√d, which costs a tenth of a general power."""
    return (torch.mul(d, d).mul_(d.sqrt_()) if norm == 2.5 else d.pow_(norm)).sum(dim=-1)  # mul: square's 0.56x


def _find_params(
    x: torch.Tensor, maxq: MaxQ, sym: bool, clip: bool, clip_grid: int, clip_max_shrink: float, clip_norm: float,
    search: tuple[int, int] = CLIP_SEARCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid for x [out, k]; with clip, the shrink factor per row minimizing Σ|x − deq|^clip_norm.

    Clipping the range trades a few saturated outliers for a finer step on everything else; at 3 bits it took the
    real model's KL from 1.67 to 0.97 (benchmarks/RESULTS.md). The shrinks are GPTQ's --mse grid, p = 1 − i/clip_grid
    down to 1 − clip_max_shrink, searched coarse to fine (search = (coarse, finest) strides): every 8th step, then
    around each row's best at half the stride, a quarter, ... one step (the error is smooth in p at that scale; 16
    tries instead of 80, each stage in one batch). The error's norm is 2.5 where GPTQ's is 2.4: d²·√d costs a tenth
    of a general power, and on SmolLM2's weights it chose the same scale for 50-88% of the rows, at a 0.3-0.8%
    larger squared error.
    """
    lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)  # amin: min(dim) is 25x slower
    if not clip:
        return _range_grid(lo, hi, maxq, sym)
    mq = maxq if isinstance(maxq, int) else maxq.unsqueeze(1)
    steps = int(clip_max_shrink * clip_grid)

    def least(i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per row, the error, step, scale and zero of the step among i [tries, out] that errs least (the first
        of equals), trying as many at once as CLIP_BATCH elements allow."""
        found = []
        for part in i.split(max(1, CLIP_BATCH // x.numel())):
            p = 1 - part / clip_grid
            scale, zero = _range_grid(lo * p, hi * p, maxq, sym)  # [tries, out]
            s, lo_q = scale.unsqueeze(-1), zero.neg().unsqueeze(-1)
            d = _dequant_(x, s, lo_q, lo_q + mq)  # [tries, out, k]
            found.append((_norm_error_(d.sub_(x).abs_(), clip_norm), part, scale, zero))  # |deq − x|
        err, i, scale, zero = (torch.cat(t) for t in zip(*found, strict=True))
        k = err.min(dim=0, keepdim=True).indices  # the first least, as argmin gives, 17x faster
        return tuple(t.gather(0, k)[0] for t in (err, i, scale, zero))

    coarse, finest = search
    best = least(torch.arange(0, steps, coarse, device=x.device, dtype=x.dtype).unsqueeze(1).expand(-1, len(x)))
    d = coarse // 2
    while d >= finest:  # halve the stride around each row's best: its neighbours d steps either side
        near = least((best[1] + torch.tensor([[-d], [d]], device=x.device, dtype=x.dtype)).clamp(1, steps - 1))
        better = near[0] < best[0]
        best = tuple(torch.where(better, n, b) for n, b in zip(near, best, strict=True))
        d //= 2
    return best[2], best[3]


def _working_hessian(H: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor) -> torch.Tensor:
    """A copy of H in quantization order with dead columns' diagonal set to 1, built a block of rows at a time so
    it costs one H-sized allocation (H[perm][:, perm] would cost two)."""
    n = H.shape[0]
    Hk = torch.empty_like(H)
    for r in range(0, n, 1024):
        rows = slice(r, min(r + 1024, n))
        Hk[rows] = H[rows] if perm is None else H[perm[rows]][:, perm]
    Hk.diagonal()[dead if perm is None else dead[perm]] = 1
    return Hk


def _inverse_cholesky(
    H: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor, damp: float, damp_step: float, max_damp: float
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (Hk + damp·mean(diag Hk)·I)⁻¹ for Hk = _working_hessian(H, perm, dead), raising
    damp by damp_step until it factorizes.

    One factorization and one triangular inverse, not GPTQ's usual three steps (Cholesky, inverse, Cholesky of
    the inverse): with J the order reversal, J Hk J = M Mᵀ (M lower) gives Hk = Ũ Ũᵀ with Ũ = J M J upper, so
    Hk⁻¹ = Ũ⁻ᵀ Ũ⁻¹ and U = Ũ⁻¹ = J M⁻¹ J. Memory matters here (Pixtral-Large's down_proj H is 3.3 GB): besides H
    at most two H-sized tensors are alive at a time; a retry rebuilds Hk from H.
    """
    d = damp
    while d <= max_damp + 1e-12:
        Hk = _working_hessian(H, perm, dead).flip(0, 1)
        diag = Hk.diagonal()
        diag += d * float(diag.mean())
        M, info = torch.linalg.cholesky_ex(Hk)
        del Hk, diag
        if int(info) == 0:
            eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
            U = torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1)
            del M, eye
            if bool(torch.isfinite(U.diagonal()).all()):
                return U, d
        d += damp_step
    raise QuantkitError(f"Hessian is not positive definite even with damping {max_damp:g} × mean(diag H)")


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, bits: int | Sequence[tuple[int, int]], group_size: int | None = 128, **options
) -> GPTQResult:
    """Quantize W [out, in] against the input Hessian H [in, in] with GPTQ (lazy-batch blocks of block_size columns).

    factors: a dict kept by the caller for one H (and act_order), where the damped inverse-Hessian factor is kept
    between calls: solving one linear at several widths (the --bpw measurement) factorizes its H once.

    act_order quantizes columns by decreasing diag(H) so the most active inputs are fixed first while the most
    error can still be compensated. Without static_groups the groups are then consecutive in that order and g_idx
    is not monotonic (the loader gathers scales per column); with static_groups the group grids are computed on the
    original W before any update and groups stay in original column order (g_idx = i // group_size).

    options: gptq_quantize_widths's keywords (sym, act_order, static_groups, damp, clip, block_size, factors, ...).
    """
    return gptq_quantize_widths(W, H, [bits], group_size, **options)[0]


def gptq_quantize_widths(
    W: torch.Tensor,
    H: torch.Tensor,
    widths: Sequence[int | Sequence[tuple[int, int]]],
    group_size: int | None = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    damp_step: float = 0.01,
    max_damp: float = 1.0,
    clip: bool = False,
    clip_grid: int = 100,
    clip_max_shrink: float = 0.8,
    clip_norm: float = 2.5,
    clip_search: tuple[int, int] = CLIP_SEARCH,
    block_size: int = 128,
    factors: dict | None = None,
    losses: bool = True,
) -> list[GPTQResult]:
    """gptq_quantize of one W at several widths or layouts in one pass (one of them, as gptq_quantize).

    GPTQ updates every output row on its own, so the rows of W stacked once per width, each copy with its own
    largest code per column, give each width's result; the --bpw measurement solves a linear's candidate settings
    that share a group size this way, one column loop for all of them instead of one each (the loop's per-column
    steps are most of a small solve). losses=False skips the proxy losses (nan), which the measurement does not read;
    clip_search (coarse, finest stride) a coarser clipping search than the default, which the measurement takes.
    """
    mixed = [not isinstance(b, int) for b in widths]
    for b, m in zip(widths, mixed, strict=True):
        _check_args(W, b if not m else 2, group_size)
    n_rows, n_in = W.shape
    n_out = n_rows * len(widths)
    if H.shape != (n_in, n_in):
        raise QuantkitError(f"Hessian shape {tuple(H.shape)} does not match in_features {n_in}")
    if any(mixed) and static_groups:
        raise QuantkitError("mixed bits need dynamic groups (no --static-groups)")
    per_copy = [column_bits(b, n_in, group_size) for b in widths]  # per copy, per column in quantization order
    col_maxq: list[MaxQ] = [2**b - 1 for b in per_copy[0]]
    if len(widths) > 1:  # one largest code per row instead, shared by the columns with the same widths
        by_key: dict[tuple[int, ...], torch.Tensor] = {}
        col_maxq = []
        for key in zip(*per_copy, strict=True):
            if key not in by_key:
                by_key[key] = torch.tensor([2.0**b - 1 for b in key], device=W.device).repeat_interleave(n_rows)
            col_maxq.append(by_key[key])
    maxq = col_maxq[0]
    dev = W.device
    W0 = W.detach().to(torch.float32)
    H0 = H.detach().to(dev, torch.float32)
    # The solve runs on a transposed [in, out] copy: a column of W is then one contiguous row, so the per-column
    # updates below stream through memory instead of striding across it (most of the CPU time of a quantize run).
    # Stacked widths are copies side by side: copy c's output row j is column c * n_rows + j.
    WkT = W0.T.contiguous()
    dead = torch.diag(H0) == 0
    if bool(dead.any()):
        WkT[dead] = 0
    if len(widths) > 1:
        WkT = WkT.repeat(1, len(widths))
    clip_args = (clip, clip_grid, clip_max_shrink, clip_norm, clip_search)

    gs = group_size or n_in
    n_groups = n_in // gs
    scales = torch.zeros(n_groups, n_out, dtype=torch.float32, device=dev)
    zeros = torch.zeros(n_groups, n_out, dtype=torch.float32, device=dev)
    if group_size is None:
        scales[0], zeros[0] = _find_params(WkT.T.contiguous(), maxq, sym, *clip_args)
    elif static_groups:
        for g in range(n_groups):
            scales[g], zeros[g] = _find_params(WkT[g * gs : (g + 1) * gs].T.contiguous(), maxq, sym, *clip_args)

    diag = torch.where(dead, 1.0, torch.diag(H0))
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    if perm is not None:
        WkT = WkT[perm]  # rows: contiguous copies, where a column gather of [out, in] strides
    if factors is not None and "U" in factors:
        U, damp_used = factors["U"], factors["damp"]
    else:
        U, damp_used = _inverse_cholesky(H0, perm, dead, damp, damp_step, max_damp)
        if factors is not None:
            factors.update(U=U, damp=damp_used)

    # Column k of the permuted matrix belongs to group gpos[k]: consecutive in quantization order unless the groups
    # were fixed up front (static or per-channel), where it is the group of the original column.
    orig = perm if perm is not None else torch.arange(n_in, device=dev)
    dynamic = group_size is not None and not static_groups
    gpos = torch.arange(n_in, device=dev) // gs if dynamic else orig // gs  # [in]
    deq = torch.zeros(n_in, n_out, dtype=torch.float32, device=dev)  # [in, out], permuted order
    bs = gs * max(1, block_size // gs) if dynamic else block_size  # dynamic groups never straddle blocks
    group_of = gpos.tolist()
    diag_u = U.diagonal().tolist()

    grid: tuple = ()  # the (group, largest code) that scale, lo and hi below are for
    for b1 in range(0, n_in, bs):
        b2 = min(b1 + bs, n_in)
        W1 = WkT[b1:b2].clone()  # [nb, out]
        E1 = torch.empty_like(W1)
        U1 = U[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            g = group_of[col]
            maxq = col_maxq[col]
            if dynamic and col % gs == 0:
                scales[g], zeros[g] = _find_params(W1[i : i + gs].T, maxq, sym, *clip_args)
            if (g, id(maxq)) != grid:  # _dequant_'s bounds for this column's group and widths
                grid, scale, lo = (g, id(maxq)), scales[g], zeros[g].neg()
                hi = lo + maxq
            w = W1[i]
            dq = _dequant_(w, scale, lo, hi, out=deq[col])
            err = torch.sub(w, dq, out=E1[i]).div_(diag_u[col])
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)  # in place: no [nb, out] temporary per column
        WkT[b2:] -= U[b1:b2, b2:].T @ E1
    del U, WkT, W1, E1, U1  # before the loss and the un-permuting, which need room of their own
    # The codes, from the dequantized values: s · (q − z) is exact in fp32 (an fp16 scale times an integer below
    # 2^8), so dividing by s gives q − z exactly; a block of columns at a time, to stay within one deq-sized tensor.
    codes = torch.empty(n_in, n_out, dtype=torch.uint8, device=dev)
    for c in range(0, n_in, bs):
        grp = gpos[c : c + bs]
        codes[c : c + bs] = deq[c : c + bs].div(scales[grp]).add_(zeros[grp])

    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq, gpos = codes[inv].T, deq.T[:, inv], gpos[inv]  # the faster of the two orders for each
    else:
        codes, deq = codes.T, deq.T
    codes, deq = codes.contiguous(), deq.contiguous()  # [out, in]
    results = []
    for k, b in enumerate(widths):
        rows = slice(k * n_rows, (k + 1) * n_rows)
        loss, rel = proxy_loss(W0, deq[rows], H0) if losses else (float("nan"), float("nan"))
        results.append(GPTQResult(
            q=codes[rows],
            scales=scales[:, rows].contiguous(),
            zeros=zeros[:, rows].to(torch.uint8).contiguous(),
            g_idx=gpos.to(torch.int32),
            perm=perm,
            weight=deq[rows],
            loss=loss,
            rel_loss=rel,
            damp=damp_used,
            dead=int(dead.sum()),
            bits=[(int(x), int(n)) for x, n in b] if mixed[k] else b,
            group_size=group_size,
            sym=sym,
            static_groups=static_groups,
        ))  # fmt: skip
    return results


def rtn_quantize(
    W: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    sym: bool = True,
    H: torch.Tensor | None = None,
    clip: bool = False,
    clip_grid: int = 100,
    clip_max_shrink: float = 0.8,
    clip_norm: float = 2.5,
) -> GPTQResult:
    """Round-to-nearest on the same grid as gptq_quantize: the baseline GPTQ must beat, and the fallback for
    modules without calibration data. With H, loss is the same output-error proxy as GPTQ's."""
    _check_args(W, bits, group_size)
    n_out, n_in = W.shape
    maxq = 2**bits - 1
    W0 = W.detach().to(torch.float32)
    gs = group_size or n_in
    n_groups = n_in // gs
    Wg = W0.reshape(n_out, n_groups, gs).transpose(0, 1).reshape(n_groups * n_out, gs)  # [groups*out, gs]
    scale, zero = _find_params(Wg, maxq, sym, clip, clip_grid, clip_max_shrink, clip_norm)  # [groups*out]
    q, dq = _quant(Wg, scale.unsqueeze(1), zero.unsqueeze(1), maxq)
    q = q.reshape(n_groups, n_out, gs).transpose(0, 1).reshape(n_out, n_in)
    dq = dq.reshape(n_groups, n_out, gs).transpose(0, 1).reshape(n_out, n_in)
    loss, rel = proxy_loss(W0, dq, H) if H is not None else (float("nan"), float("nan"))
    return GPTQResult(
        q=q.to(torch.uint8),
        scales=scale.reshape(n_groups, n_out),
        zeros=zero.reshape(n_groups, n_out).to(torch.uint8),
        g_idx=(torch.arange(n_in, device=W0.device) // gs).to(torch.int32),
        perm=None,
        weight=dq,
        loss=loss,
        rel_loss=rel,
        damp=float("nan"),
        dead=0,
        bits=bits,
        group_size=group_size,
        sym=sym,
    )
