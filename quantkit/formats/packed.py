"""quantkit's own packed linear format: mixed-bit segments of power-of-two bit planes, group scales, act order.

One linear W [out=N, in=K] is stored in *kernel order*: input column k of the kernel is original column perm[k]
(act order; identity when perm is None). The kernel-order columns are padded to K_pad (a multiple of 32 and of the
group size G) and split into segments (bits, n_cols) covering them in order, so a matrix can spend more bits on its
first (most salient) columns. Group g covers kernel columns [g·G, (g+1)·G); a segment boundary is a group boundary.

Codes of b bits are split into power-of-two planes, widest first and lowest bits first (3 -> 2+1, 5 -> 4+1,
6 -> 4+2, 7 -> 4+2+1; 2/4/8 are one plane). A plane of width w is int32 [n_cols·w/32, N] packed along K with
32/w codes per word, LSB first (quantkit.formats.bits.pack_bits, dim=0), so every word holds whole codes and a kernel
tile of 32·j rows maps to whole words of every plane: no code straddles a word, whatever b is.

Dequantization: W[:, perm[k]] = scales[k // G] · (code[k] − zero[k // G]), zero = zeros[...] or 2^(b−1) when zeros is
None (symmetric). With rotation signs the stored matrix is R_outᵀ W R_in (formats.hadamard); `dequantize` undoes it.
The safetensors layout is specified in docs/format.md ("quantkit format").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import hadamard
from quantkit.formats.bits import pack_bits, unpack_bits

FORMAT_VERSION = 1
BITS = (2, 3, 4, 5, 6, 7, 8)
META_LEN = 6  # qmeta: version, in_features, out_features, group_size, had_in_block, had_out_block


def plane_widths(bits: int) -> tuple[int, ...]:
    """Power-of-two plane widths of a b-bit code, widest (lowest bits) first: 3 -> (2, 1), 7 -> (4, 2, 1)."""
    if bits not in BITS:
        raise QuantkitError(f"the quantkit format stores {BITS[0]}-{BITS[-1]}-bit codes, not {bits}")
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


@dataclass
class Segment:
    """Kernel-order columns [start, start + n_cols) of one linear, at `bits` bits."""

    bits: int
    n_cols: int
    planes: list[torch.Tensor]  # per width in plane_widths(bits): int32 [n_cols·w/32, N]


@dataclass
class PackedLinear:
    """One quantized linear in the quantkit format; y = x Wᵀ + bias with W = dequantize(self)."""

    in_features: int  # K
    out_features: int  # N
    group_size: int  # G
    segments: list[Segment]
    scales: torch.Tensor  # fp16 [K_pad/G, N]
    zeros: torch.Tensor | None  # uint8 [K_pad/G, N]; None = symmetric (zero 2^(b-1) of the segment's bits)
    perm: torch.Tensor | None = None  # int32 [K]: kernel column k reads x[..., perm[k]]
    bias: torch.Tensor | None = None  # [N], float
    had_in: torch.Tensor | None = None  # int8 [K] rotation signs of the input features
    had_in_block: int = 0
    had_out: torch.Tensor | None = None  # int8 [N] rotation signs of the output features
    had_out_block: int = 0

    @property
    def padded_in_features(self) -> int:
        return sum(s.n_cols for s in self.segments)

    @property
    def layout(self) -> list[tuple[int, int]]:
        """[(bits, n_cols)] per segment, in kernel column order."""
        return [(s.bits, s.n_cols) for s in self.segments]

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def to(self, device: torch.device | str) -> PackedLinear:
        """A copy with every tensor on device (dtypes kept)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        segs = [Segment(s.bits, s.n_cols, [p.to(device) for p in s.planes]) for s in self.segments]
        return replace(
            self,
            segments=segs,
            scales=mv(self.scales),
            zeros=mv(self.zeros),
            perm=mv(self.perm),
            bias=mv(self.bias),
            had_in=mv(self.had_in),
            had_out=mv(self.had_out),
        )


def padded_layout(
    in_features: int, bits: int | Sequence[tuple[int, int]], group_size: int | None
) -> tuple[int, list[tuple[int, int]]]:
    """(G, [(bits, n_cols)]) after padding: K_pad = in_features rounded up to lcm(G, 32); the last segment grows.

    bits is one width for the whole matrix or [(bits, n_cols)] covering in_features in kernel order (the last
    n_cols may stop at in_features). group_size None means one group per output row (G = K_pad).
    """
    if in_features < 1:
        raise QuantkitError(f"in_features must be positive, got {in_features}")
    segs = [(int(bits), in_features)] if isinstance(bits, int) else [(int(b), int(n)) for b, n in bits]
    if not segs:
        raise QuantkitError("a packed linear needs at least one bit segment")
    for b, _ in segs:
        plane_widths(b)
    if group_size is None:
        if len(segs) > 1:
            raise QuantkitError("mixed bit segments need a group size (segment boundaries are group boundaries)")
        k_pad = -(-in_features // 32) * 32
        return k_pad, [(segs[0][0], k_pad)]
    if group_size < 1:
        raise QuantkitError(f"group size must be positive, got {group_size}")
    unit = math.lcm(group_size, 32)
    k_pad = -(-in_features // unit) * unit
    for b, n in segs[:-1]:
        if n <= 0 or n % unit:
            raise QuantkitError(f"segment of {n} columns at {b} bits: must be a positive multiple of {unit}")
    head = sum(n for _, n in segs[:-1])
    last = segs[-1][1]
    if last <= 0 or head + last > k_pad or head + last < in_features:
        raise QuantkitError(f"bit segments cover {head + last} columns, expected {in_features} (padded {k_pad})")
    return group_size, segs[:-1] + [(segs[-1][0], k_pad - head)]


def _as_perm(perm: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """A given perm is stored as given, identity included: whether a linear stores one is a property of its
    settings (see stores_perm), so that its size is known before the solver runs."""
    if perm is None:
        return None
    p = perm.to(torch.int64).reshape(-1)
    if p.shape != (k,) or not torch.equal(torch.sort(p).values, torch.arange(k, device=p.device)):
        raise QuantkitError(f"perm must be a permutation of range({k})")
    return p.to(torch.int32)


def stores_perm(in_features: int, group_size: int | None, act_order: bool, static_groups: bool = False) -> bool:
    """Whether a GPTQ result packs with an input permutation: act order with dynamic groups and more than one group
    (one group, a per-channel grid or static groups do not depend on column order)."""
    return act_order and not static_groups and group_size is not None and -(-in_features // group_size) > 1


def _signs(s: torch.Tensor | None, n: int, block: int, what: str) -> tuple[torch.Tensor | None, int]:
    if s is None:
        return None, 0
    s = s.reshape(-1)
    if s.shape != (n,) or not bool(((s == 1) | (s == -1)).all()):
        raise QuantkitError(f"{what} rotation signs must be ±1 of shape ({n},)")
    if block < 1 or block & (block - 1) or n % block:
        raise QuantkitError(f"{what} Hadamard block {block} must be a power of two dividing {n}")
    return s.to(torch.int8), block


def pack_linear(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int | None,
    bits: int | Sequence[tuple[int, int]],
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    had_in: torch.Tensor | None = None,
    had_in_block: int = 0,
    had_out: torch.Tensor | None = None,
    had_out_block: int = 0,
) -> PackedLinear:
    """Pack codes q [N, K] (original column order, as GPTQResult.q) into a PackedLinear.

    scales/zeros [n_groups, N] index groups of kernel-order columns (k // G), n_groups ≥ ceil(K/G); zeros None =
    symmetric. bits: see padded_layout. perm must put each group's columns together (k // G); a GPTQResult with
    static_groups keeps groups in original order, so pack solver results with formats.gptq.pack_gptq_result, which
    derives perm from g_idx. Padding columns get code 0; the kernels never read their inputs.
    """
    n, k = q.shape
    g, layout = padded_layout(k, bits, group_size)
    k_pad = sum(c for _, c in layout)
    n_groups = k_pad // g
    p = _as_perm(perm, k)
    if scales.dim() != 2 or scales.shape[1] != n or not -(-k // g) <= scales.shape[0] <= n_groups:
        raise QuantkitError(f"scales must be [n_groups, {n}] with {-(-k // g)}..{n_groups} groups, got {scales.shape}")
    if zeros is not None and zeros.shape != scales.shape:
        raise QuantkitError(f"zeros {tuple(zeros.shape)} must match scales {tuple(scales.shape)}")
    if zeros is not None and (int(zeros.min()) < 0 or int(zeros.max()) > 255):
        raise QuantkitError("zero points must fit in uint8")
    sc = torch.ones(n_groups, n, dtype=torch.float16, device=q.device)
    sc[: scales.shape[0]] = scales.to(torch.float16)
    zr = None
    if zeros is not None:
        zr = torch.zeros(n_groups, n, dtype=torch.uint8, device=q.device)
        zr[: zeros.shape[0]] = zeros.to(torch.uint8)
    codes = q.to(torch.int64)
    if p is not None:
        codes = codes[:, p.long()]
    codes = torch.nn.functional.pad(codes, (0, k_pad - k)).T  # [K_pad, N] kernel order
    segments, start = [], 0
    for b, cols in layout:
        c = codes[start : start + cols]  # [cols, N]
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**b):
            raise QuantkitError(f"codes of columns {start}..{start + cols} out of range for {b} bits")
        planes, low = [], 0
        for w in plane_widths(b):
            planes.append(pack_bits((c >> low) & (2**w - 1), w, dim=0))  # [cols·w/32, N]
            low += w
        segments.append(Segment(b, cols, planes))
        start += cols
    hi, hib = _signs(had_in, k, had_in_block, "input")
    ho, hob = _signs(had_out, n, had_out_block, "output")
    return PackedLinear(k, n, g, segments, sc, zr, p, bias, hi, hib, ho, hob)


def unpack_codes(pl: PackedLinear) -> torch.Tensor:
    """int32 [N, K_pad] codes in kernel (permuted, padded) column order."""
    cols = []
    for seg in pl.segments:
        c, low = 0, 0
        for w, plane in zip(plane_widths(seg.bits), seg.planes, strict=True):
            c = c | (unpack_bits(plane, w, dim=0) << low)  # [n_cols, N]
            low += w
        cols.append(c)
    return torch.cat(cols, dim=0).T.contiguous()


def zero_points(pl: PackedLinear) -> torch.Tensor:
    """fp32 [K_pad/G, N] zero point of every group (2^(b-1) of the group's segment when symmetric)."""
    if pl.zeros is not None:
        return pl.zeros.float()
    mids = [torch.full((s.n_cols // pl.group_size,), 2.0 ** (s.bits - 1)) for s in pl.segments]
    return torch.cat(mids).to(pl.device)[:, None].expand(-1, pl.out_features)


def dequantize_kernel_order(pl: PackedLinear) -> torch.Tensor:
    """fp32 [N, K_pad]: the stored (rotated) matrix in kernel column order, padding columns included."""
    g = torch.arange(pl.padded_in_features, device=pl.device) // pl.group_size  # [K_pad]
    s = pl.scales.float()[g].T  # [N, K_pad]
    z = zero_points(pl)[g].T
    return s * (unpack_codes(pl).float() - z)


def dequantize(pl: PackedLinear, unrotate: bool = True) -> torch.Tensor:
    """W fp32 [N, K] in original column order, so that y = x Wᵀ + bias; unrotate=False keeps R_outᵀ W R_in."""
    w = dequantize_kernel_order(pl)[:, : pl.in_features]
    if pl.perm is not None:
        w = torch.empty_like(w).index_copy_(1, pl.perm.long(), w)  # W[:, perm[k]] = W_kernel[:, k]
    if unrotate and pl.had_in is not None:
        w = hadamard.rotate(w, pl.had_in, pl.had_in_block, transpose=True)  # W R_in Rᵀ_in
    if unrotate and pl.had_out is not None:
        w = hadamard.rotate(w.T, pl.had_out, pl.had_out_block, transpose=True).T  # R_out (R_outᵀ W)
    return w


def _name(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def plane_name(seg: int, width: int) -> str:
    return f"seg{seg}_w{width}"


def to_tensors(pl: PackedLinear, prefix: str = "") -> dict[str, torch.Tensor]:
    """The safetensors entries of one linear: `{prefix}.qmeta`, `.segments`, `.seg{i}_w{w}`, `.scales`, ..."""
    meta = [FORMAT_VERSION, pl.in_features, pl.out_features, pl.group_size, pl.had_in_block, pl.had_out_block]
    out = {
        _name(prefix, "qmeta"): torch.tensor(meta, dtype=torch.int32),
        _name(prefix, "segments"): torch.tensor(pl.layout, dtype=torch.int32).reshape(-1, 2),
        _name(prefix, "scales"): pl.scales,
    }
    for i, seg in enumerate(pl.segments):
        for w, plane in zip(plane_widths(seg.bits), seg.planes, strict=True):
            out[_name(prefix, plane_name(i, w))] = plane
    optional = {"zeros": pl.zeros, "perm": pl.perm, "bias": pl.bias, "had_in": pl.had_in, "had_out": pl.had_out}
    out.update({_name(prefix, k): v for k, v in optional.items() if v is not None})
    return out


def _get(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if name not in tensors:
        raise QuantkitError(f"quantkit format: missing tensor {name}")
    t = tensors[name]
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise QuantkitError(f"quantkit format: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    return t


def from_tensors(prefix: str, tensors: dict[str, torch.Tensor]) -> PackedLinear:
    """Inverse of to_tensors: rebuild (and shape-check) a PackedLinear from its named tensors (no copies)."""
    meta_name = _name(prefix, "qmeta")
    if meta_name not in tensors:
        raise QuantkitError(f"quantkit format: missing tensor {meta_name}")
    meta = [int(v) for v in tensors[meta_name].tolist()]
    if len(meta) != META_LEN or meta[0] != FORMAT_VERSION:
        raise QuantkitError(f"{meta_name}: unsupported quantkit format header {meta} (version {FORMAT_VERSION})")
    _, k, n, g, hib, hob = meta
    seg_t = tensors.get(_name(prefix, "segments"))
    if seg_t is None or seg_t.dim() != 2 or seg_t.shape[1] != 2:
        raise QuantkitError(f"quantkit format: {_name(prefix, 'segments')} missing or not [n_segments, 2]")
    layout = [(int(b), int(c)) for b, c in seg_t.tolist()]
    try:
        g2, padded = padded_layout(k, layout, g)
    except QuantkitError as e:
        raise QuantkitError(f"{prefix}: inconsistent segment table {layout}: {e}") from None
    if padded != layout:
        raise QuantkitError(f"{prefix}: segment table {layout} does not pad {k} columns to a group multiple")
    k_pad = sum(c for _, c in layout)
    segments = []
    for i, (b, cols) in enumerate(layout):
        widths = plane_widths(b)
        planes = [_get(tensors, _name(prefix, plane_name(i, w)), (cols * w // 32, n), torch.int32) for w in widths]
        segments.append(Segment(b, cols, planes))
    scales = _get(tensors, _name(prefix, "scales"), (k_pad // g2, n), torch.float16)
    opt = {key: tensors.get(_name(prefix, key)) for key in ("zeros", "perm", "bias", "had_in", "had_out")}
    if opt["zeros"] is not None:
        _get(tensors, _name(prefix, "zeros"), (k_pad // g2, n), torch.uint8)
    if opt["perm"] is not None:
        _get(tensors, _name(prefix, "perm"), (k,), torch.int32)
    if opt["bias"] is not None and tuple(opt["bias"].shape) != (n,):
        raise QuantkitError(f"{_name(prefix, 'bias')} must have shape ({n},)")
    for key, size, block in (("had_in", k, hib), ("had_out", n, hob)):
        if (opt[key] is None) != (block == 0):
            raise QuantkitError(f"{prefix}: {key} signs and their block size in qmeta disagree")
        if opt[key] is not None:
            _get(tensors, _name(prefix, key), (size,), torch.int8)
    return PackedLinear(
        k, n, g2, segments, scales, opt["zeros"], opt["perm"], opt["bias"], opt["had_in"], hib, opt["had_out"], hob
    )


def stored_bits_for(
    out_features: int,
    in_features: int,
    bits: int | Sequence[tuple[int, int]],
    group_size: int | None,
    *,
    asym: bool,
    act_order: bool,
    static_groups: bool = False,
    bias_bits: int = 0,
    had_in: bool = False,
    had_out: bool = False,
) -> int:
    """Bits on disk of a linear with this shape and layout, before packing: what the bpw allocator budgets.

    Counts every stored tensor: codes (padding included), fp16 scales, uint8 zeros, int32 perm (see stores_perm),
    the int32 segment table and header, the bias (bias_bits per output, 0 = no bias) and int8 rotation signs.
    Equals stored_bits of the packed result (safetensors' per-tensor JSON header, ~100 bytes, is not counted).
    """
    g, layout = padded_layout(in_features, bits, group_size)
    n_groups = sum(c for _, c in layout) // g
    total = out_features * sum(b * c for b, c in layout)  # codes
    total += 16 * n_groups * out_features  # scales
    total += 8 * n_groups * out_features if asym else 0  # zeros
    total += 32 * in_features if stores_perm(in_features, group_size, act_order, static_groups) else 0
    total += 32 * (META_LEN + 2 * len(layout))  # qmeta + segment table
    total += bias_bits * out_features
    total += 8 * in_features if had_in else 0
    total += 8 * out_features if had_out else 0
    return total


def stored_bits(pl: PackedLinear) -> int:
    """Bits of every tensor to_tensors(pl) writes."""
    return sum(t.numel() * t.element_size() * 8 for t in to_tensors(pl).values())
