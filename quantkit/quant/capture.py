"""Quantize one decoder layer in place from its calibration inputs, group by group (true sequential).

For each capture group (q/k/v, then o, then gate/up, then down; arch.blocks.BLOCK_KINDS) the layer is run over all
calibration rows with hooks that accumulate each input site's Hessian H = XᵀX, then every linear of the group
is solved with GPTQ and its weight replaced by the dequantized one, so the next group is captured on the
outputs of the already-quantized parts. Only this layer's weights and one row of activations are resident.
MoE experts see only the tokens routed to them; an expert that got too few tokens for a usable Hessian gets
the Hessian of every token entering the MoE block instead (computed through its own w1/w3 for w2), and is
reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.arch.blocks import block_kind, block_of, expert_index
from quantkit.errors import QuantkitError
from quantkit.formats.hadamard import block_size, random_signs, rotate
from quantkit.formats.spec import LinearSpec, QuantSettings
from quantkit.memory import release
from quantkit.quant.gptq import CLIP_SEARCH, GPTQResult, HessianAccumulator, gptq_quantize_widths

STARVED_FRACTION = 0.1  # an expert with < 10% of the tokens uniform routing would give it is "starved"


@dataclass
class Solved:
    """A solved linear: the GPTQ result (in the rotated basis when rotated) and the rotation to store with it."""

    result: GPTQResult
    had_in: torch.Tensor | None = None  # int8 [in] signs
    had_in_block: int = 0

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's own basis: what the next capture groups must see."""
        w = self.result.weight
        return w if self.had_in is None else rotate(w, self.had_in, self.had_in_block, transpose=True)

    @property
    def rel_loss(self) -> float:
        return self.result.rel_loss

    @property
    def damp(self) -> float:
        return self.result.damp


def solve_linear(
    W: torch.Tensor, H: torch.Tensor, spec: LinearSpec, s: QuantSettings, factors: dict | None = None
) -> Solved:
    """GPTQ for one linear; with a rotation, quantize W R against Rᵀ H R (R = diag(signs)·Hadamard, orthogonal),
    which spreads outlier input channels over whole blocks so that no single column dominates a group.
    factors: gptq_quantize's cache of H's factorization, for solving one linear with one rotation repeatedly."""
    return solve_linear_widths(W, H, [spec], s, factors)[0]


def grid_kind(spec: LinearSpec, s: QuantSettings) -> tuple:
    """What specs solved together in one GPTQ pass (solve_linear_widths) must share: group size, rotation and
    symmetry."""
    return spec.group_size, spec.rotate_seed, s.sym_for(spec.bits)


def solve_linear_widths(
    W: torch.Tensor, H: torch.Tensor, specs: list[LinearSpec], s: QuantSettings, factors: dict | None = None,
    losses: bool = True, clip_search: tuple[int, int] = CLIP_SEARCH,
) -> list[Solved]:
    """solve_linear for specs that differ only in their widths or layouts (or one spec), in one GPTQ pass (the
    measurement's: losses=False, without the proxy losses, and a coarser clip_search)."""
    spec = specs[0]
    sym = s.sym_for(spec.bits)
    if any(grid_kind(sp, s) != grid_kind(spec, s) for sp in specs):
        raise QuantkitError("internal: widths solved together must share group size, rotation and symmetry")
    signs, block = None, 0
    if spec.rotate_seed is not None:
        block = block_size(W.shape[1])
        signs = random_signs(W.shape[1], spec.rotate_seed)
        W = rotate(W, signs, block)  # W R
        H = rotate(rotate(H, signs, block).T, signs, block)  # Rᵀ H R
    widths = [list(sp.bits) if not isinstance(sp.bits, int) else sp.bits for sp in specs]
    results = gptq_quantize_widths(
        W, H, widths, spec.group_size, sym=sym, act_order=s.act_order, static_groups=s.static_groups,
        damp=s.damp, clip=s.clip, clip_search=clip_search, factors=factors, losses=losses,
    )  # fmt: skip
    return [Solved(res, signs, block) for res in results]


@dataclass
class LayerReport:
    """What happened to one layer: per-linear proxy losses and damping, output error, starved experts."""

    rel_loss: dict[str, float] = field(default_factory=dict)  # tr(E H Eᵀ) / tr(W H Wᵀ) per linear
    damp: dict[str, float] = field(default_factory=dict)  # damping used per linear
    rel_error: float = 0.0  # ||y_q - y_f|| / ||y_f|| over the calibration rows (y includes the residual stream)
    starved: dict[str, int] = field(default_factory=dict)  # expert linear -> tokens routed to it


def capture_groups(layer: nn.Module) -> list[list[str]]:
    """The layer's linears to quantize, in capture order, with experts expanded."""
    kind = block_kind(layer)
    n_experts = len(layer.get_submodule(kind.moe).experts) if kind.moe else 0
    groups = []
    for group in kind.capture_groups:
        names = []
        for e in range(max(n_experts, 1)) if any("{E}" in n for n in group) else [None]:
            names += [n.format(E=e) if e is not None else n for n in group]
        groups.append(names)
    return groups


def _site(name: str) -> str:
    """Linears under one parent module read the same input (q/k/v, gate/up, an expert's w1/w3)."""
    return name.rpartition(".")[0]


RowFn = Callable[[int], torch.Tensor]


class MemoryRows:
    """Rows held in memory, with the read/write of the job's on-disk row stores (the vision tower's one row)."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def read(self, r: int) -> torch.Tensor:
        return self.rows[r]

    def write(self, r: int, t: torch.Tensor) -> None:
        self.rows[r] = t


@dataclass
class LayerIO:
    """Where one layer's calibration rows come from and where its outputs go: `inputs` and `outputs` are row
    stores (read(r) / write(r, t)); `middle` holds the attention half's outputs during measurement."""

    rows: int
    inputs: object
    outputs: object
    device: torch.device | str = "cpu"
    middle: object | None = None

    def read(self, r: int) -> torch.Tensor:
        return self.inputs.read(r).to(self.device)

    def read_out(self, r: int) -> torch.Tensor:
        return self.outputs.read(r)

    def read_middle(self, r: int) -> torch.Tensor:
        return self.middle.read(r).to(self.device)

    def write_out(self, r: int, t: torch.Tensor) -> None:
        self.outputs.write(r, t)


def _run_rows(layer: nn.Module, rows: int, read: RowFn, ctx, write: Callable | None = None) -> None:
    with torch.no_grad():
        for r in range(rows):
            y = layer(read(r), ctx)
            if write is not None:
                write(r, y)


def attach_hessians(
    layer: nn.Module, names: list[str], site: Callable[[str], str] = _site
) -> tuple[dict[str, HessianAccumulator], list]:
    """One HessianAccumulator per input site of the named linears, fed by forward pre-hooks; returns
    (accumulators by site, hook handles to remove)."""
    accs: dict[str, HessianAccumulator] = {}
    hooks = []
    for name in names:
        key = site(name)
        if key in accs:
            continue
        linear = layer.get_submodule(name)
        accs[key] = acc = HessianAccumulator(linear.in_features, device=linear.weight.device)
        hooks.append(linear.register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    return accs, hooks


def _capture(
    layer: nn.Module, names: list[str], rows: int, read: RowFn, forward: Callable, write: Callable | None = None
) -> dict[str, HessianAccumulator]:
    """Run all rows through forward (the layer or one half of it; writing its outputs if asked), accumulating one
    Hessian per input site of the named linears."""
    accs, hooks = attach_hessians(layer, names)
    try:
        with torch.no_grad():
            for r in range(rows):
                y = forward(read(r))
                if write is not None:
                    write(r, y)
    finally:
        for h in hooks:
            h.remove()
    return accs


def shared_expert_hessians(
    layer: nn.Module, experts: list[int], down: bool, rows: int, read: RowFn, ctx
) -> dict[int, HessianAccumulator]:
    """Hessians from every token entering the MoE block, for starved experts (w1/w3 input, or w2's via w1/w3)."""
    moe = layer.get_submodule(block_kind(layer).moe)
    accs = {e: HessianAccumulator(moe.experts[e].w2.in_features if down else moe.gate.in_features) for e in experts}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        for e, acc in accs.items():
            ex = moe.experts[e]
            acc.add(F.silu(ex.w1(x)) * ex.w3(x) if down else x)

    handle = moe.register_forward_pre_hook(hook)
    try:
        _run_rows(layer, rows, read, ctx)
    finally:
        handle.remove()
    return accs


def quantize_layer(
    layer: nn.Module,
    io: LayerIO,
    ctx,
    settings: QuantSettings,
    spec_for: Callable[[str], LinearSpec],
    emit: Callable[[str, Solved], None],
    solve: Callable = solve_linear,
) -> LayerReport:
    """Quantize layer (in place) on rows io.read(r) -> [1, T, D]; each linear is solved by solve (GPTQ, or the
    output format's own solver: quant/solvers.py) with spec_for(name) (names relative to the layer) and goes to
    emit(name, solved).

    The float layer's outputs are written to the output store during the first capture pass (the layer is still
    unquantized then), and replaced by the quantized layer's outputs at the end, which also gives the output error
    without a second copy of the layer's weights. With io.middle (a decoder layer), later groups run only the half
    they need: once the attention linears are solved, the attention half's outputs go to io.middle, and the MLP
    groups and the final pass start from there instead of running attention again.
    """
    rows, read = io.rows, io.read
    report = LayerReport()
    total_tokens = 0
    halves, middle_done = io.middle is not None, False
    full = lambda x: layer(x, ctx)  # noqa: E731
    for k, names in enumerate(capture_groups(layer)):
        forward, source = full, read
        if halves and k > 0 and block_of(names[0]) == "attn":
            forward = lambda x: layer.attn_block(x, ctx)  # noqa: E731
        elif halves and k > 0:
            if not middle_done:
                _capture(layer, [], rows, read, lambda x: layer.attn_block(x, ctx), io.middle.write)
                middle_done = True
            forward, source = layer.mlp_block, io.read_middle
        accs = _capture(layer, names, rows, source, forward, io.write_out if k == 0 else None)
        experts = {e for n in names if (e := expert_index(n)) is not None}
        if experts:
            moe = layer.get_submodule(block_kind(layer).moe)
            total_tokens = total_tokens or rows * read(0).shape[1]
            fair = total_tokens * moe.top_k / len(moe.experts)
            counts = {e: int(accs[_site(n)].total_weight) for n in names if (e := expert_index(n)) is not None}
            starved = sorted(e for e, c in counts.items() if c < STARVED_FRACTION * fair)
            if starved:
                down = names[0].endswith(".w2")
                shared = shared_expert_hessians(layer, starved, down, rows, read, ctx)
                for n in names:
                    e = expert_index(n)
                    if e in shared:
                        report.starved[n] = counts[e]
                        accs[_site(n)].merge(shared[e])
        for site in list(accs):
            H = accs.pop(site).hessian()  # free the accumulator before solving: H is the biggest tensor here
            for name in (n for n in names if _site(n) == site):
                linear = layer.get_submodule(name)
                solved = solve(linear.weight.data, H, spec_for(name), settings)
                linear.weight.data = solved.weight.to(linear.weight.dtype)
                report.rel_loss[name], report.damp[name] = solved.rel_loss, solved.damp
                emit(name, solved)
                del solved
            del H
            release()
    err, ref = 0.0, 0.0
    with torch.no_grad():
        for r in range(rows):
            y = layer.mlp_block(io.read_middle(r)) if middle_done else layer(read(r), ctx)
            y_f = io.read_out(r).to(y.device)
            err += float((y.float() - y_f.float()).pow(2).sum())
            ref += float(y_f.float().pow(2).sum())
            io.write_out(r, y)
    report.rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
    return report
