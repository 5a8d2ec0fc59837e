"""QuantLinear: an nn.Module holding one PackedLinear as buffers, so state_dict() is the quantkit format itself.

gptq_to_packed turns a GPTQ-format linear (qweight, qzeros, scales, g_idx) into the same PackedLinear, so GPTQ
checkpoints run through the same kernels (the loader repacks each one after loading: formats/gptq_format.py).

On CPU, 4-bit linears with bf16 activations can run on aten's packed int4 kernel (int4_pack / int4_matmul): decoding
is memory-bound there, and the kernel reads 0.5 byte per weight where a kept dequantized weight costs 2 (bf16) or 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import hadamard
from quantkit.formats.bits import unpack_bits
from quantkit.formats.gptq import GPTQ_FORMATS, from_gptq
from quantkit.formats.packed import (
    PackedLinear,
    Segment,
    dequantize,
    from_tensors,
    to_tensors,
    zero_points,
)
from quantkit.kernels import check_backend, quant_matmul, resolve_backend
from quantkit.kernels.reference import kernel_input

CONVERT_ELEMENTS = 1 << 24  # weights repacked per slice of a GPTQ linear: bounds the conversion's scratch memory
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten's CPU int4 kernel takes
INT4_DTYPE = torch.bfloat16  # the only activation dtype that kernel vectorizes on x86 (fp16 and fp32 run scalar code)
INT4_ROWS = 8  # up to this many rows the int4 kernel beats a kept bf16 weight; above, prefill uses the kept weight


@dataclass
class Int4Pack:
    """A linear in the layout of aten's CPU int4 kernel: W[n, k] = (q − 8)·s + o per group, o = (8 − zero)·s."""

    weight: torch.Tensor  # uint8, from _convert_weight_to_int4pack_for_cpu of the codes [N_pad, K_pad]
    scales_and_zeros: torch.Tensor  # bf16 [K_pad / group, N_pad, 2]: (s, o)
    group: int  # a divisor of the linear's group size in INT4_GROUPS (its scales repeated when smaller)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales_and_zeros))


def int4_kernel_available() -> bool:
    """aten's CPU int4 ops exist and run vectorized code here (AVX2 / AVX512; elsewhere they are far slower)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


def int4_group(pl: PackedLinear) -> int | None:
    """The group size int4_pack gives pl, or None when the kernel cannot run it (not one 4-bit segment, a group size
    that is no multiple of 32, not on the CPU)."""
    if pl.device.type != "cpu" or pl.layout != [(4, pl.padded_in_features)]:
        return None
    return next((g for g in INT4_GROUPS if pl.group_size % g == 0), None)


def int4_pack(pl: PackedLinear) -> Int4Pack:
    """pl's codes and grid repacked for aten's CPU int4 kernel (int4_group(pl) must not be None).

    Output features are padded to a multiple of 16 (the kernel's requirement) with zero codes and scales. The kernel
    dequantizes (q − 8)·s + o in fp32 from bf16 s and o, so o = (8 − zero)·s reproduces s·(q − zero). Codes are
    repacked in slices of 64·j output features (the kernel packs blocks of 64 or 32 independently), which bounds the
    scratch memory by CONVERT_ELEMENTS codes.
    """
    g = int4_group(pl)
    if g is None:
        raise QuantkitError(f"no int4 CPU kernel for layout {pl.layout}, group size {pl.group_size} on {pl.device}")
    n, pad = pl.out_features, -pl.out_features % 16
    plane = pl.segments[0].planes[0]  # int32 [K_pad / 8, N]
    step = max(64, CONVERT_ELEMENTS // pl.padded_in_features // 64 * 64)
    parts = []
    for n0 in range(0, n, step):
        codes = unpack_bits(plane[:, n0 : n0 + step], 4, dim=0).T  # int32 [rows, K_pad]
        codes = F.pad(codes, (0, 0, 0, pad if n0 + step >= n else 0)).contiguous()
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    weight = torch.cat(parts)
    s = pl.scales.float().repeat_interleave(pl.group_size // g, dim=0)  # [K_pad / g, N]
    z = zero_points(pl).repeat_interleave(pl.group_size // g, dim=0)
    sz = F.pad(torch.stack([s, (8 - z) * s], dim=-1), (0, 0, 0, pad))  # [K_pad / g, N_pad, 2]
    return Int4Pack(weight, sz.to(INT4_DTYPE).contiguous(), g)


def int4_matmul(x: torch.Tensor, pl: PackedLinear, pack: Int4Pack) -> torch.Tensor:
    """reference_matmul's data flow (rotate, gather by perm, multiply, un-rotate, bias) with the product on aten's
    int4 kernel; x is bf16 [..., K], y bf16 [..., N] (fp32 accumulation, rounded once to bf16)."""
    k, n = pl.in_features, pl.out_features
    lead = x.shape[:-1]
    x2 = kernel_input(x.reshape(-1, k), pl, fast=True)
    if pl.padded_in_features > k:
        x2 = F.pad(x2, (0, pl.padded_in_features - k))  # padding columns have code 0: any x works
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), pack.weight, pack.group, pack.scales_and_zeros)
    y = y[:, :n]
    if pl.had_out is not None:
        y = hadamard.rotate(y.float(), pl.had_out, pl.had_out_block, transpose=True).to(x.dtype)
    if pl.bias is not None:
        y = y + pl.bias.to(x.dtype)
    return y.reshape(*lead, n)


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with packed weights; `backend` is "auto", "triton" or "torch" (see quant_matmul).

    Buffer names are the format's tensor suffixes (qmeta, segments, seg0_w4, scales, ...), so a module at
    `layers.0.mlp.up_proj` saves and loads exactly the tensors `to_tensors(pl, "layers.0.mlp.up_proj")` names.
    Moving the module (.to / .cuda / .half) changes the device only: codes, fp16 scales and zero points keep their
    dtypes, since a cast would corrupt them.

    The backend is resolved once per device (not on every forward). On the torch backend, `keep_dense(dtype)` keeps
    the dequantized weight next to the codes, so a forward is one F.linear instead of a dequantization: that is what
    makes CPU decoding as fast as the float model (the caller decides whether the memory is there; see
    quantkit.quantized_model.keep_dequantized). `keep_int4()` adds the int4 kernel's repack for bf16 activations on CPU:
    decode steps (up to INT4_ROWS rows) then read 0.5 byte per weight instead of the kept weight's 2.
    """

    def __init__(self, packed: PackedLinear, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        for name, t in to_tensors(packed).items():
            self.register_buffer(name, t)
        self._packed: PackedLinear | None = None
        self._resolved: str | None = None
        self._dense: torch.Tensor | None = None
        self._int4: Int4Pack | None = None

    @classmethod
    def from_tensors(cls, prefix: str, tensors: dict[str, torch.Tensor], backend: str = "auto") -> QuantLinear:
        """The module for the linear stored under prefix in a quantkit-format checkpoint."""
        return cls(from_tensors(prefix, tensors), backend=backend)

    @property
    def packed(self) -> PackedLinear:
        """The PackedLinear view of the current buffers (rebuilt after a device move or state_dict load)."""
        if self._packed is None:
            self._packed = from_tensors("", dict(self.named_buffers(recurse=False)))
        return self._packed

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        device = fn(torch.empty(0, dtype=torch.float16, device=self.scales.device)).device
        for name, buf in list(self.named_buffers(recurse=False)):
            self.register_buffer(name, buf.to(device))
        self._packed = None
        self._resolved = None
        self._dense = None if self._dense is None or self._dense.device == device else self._dense.to(device)
        self._int4 = None if device.type != "cpu" else self._int4
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None
        self._dense = None
        self._int4 = None

    def set_backend(self, backend: str) -> None:
        """Switch backend ("auto", "triton", "torch"); resolved against the buffers' device right away."""
        self.backend = check_backend(backend)
        self._resolved = resolve_backend(backend, self.scales.device)
        if self._resolved != "torch":
            self._dense = None
            self._int4 = None

    @property
    def resolved_backend(self) -> str:
        """"triton" or "torch" for the buffers' current device, resolved once."""
        if self._resolved is None:
            self._resolved = resolve_backend(self.backend, self.scales.device)
        return self._resolved

    def dense_bytes(self, dtype: torch.dtype) -> int:
        """Bytes the dequantized weight takes in dtype."""
        return self.in_features * self.out_features * torch.empty(0, dtype=dtype).element_size()

    def keep_dense(self, dtype: torch.dtype | None) -> None:
        """Keep the dequantized weight [N, K] in dtype for the torch backend (None: drop it)."""
        if dtype is None or self.resolved_backend != "torch":
            self._dense = None
            return
        self._dense = dequantize(self.packed).to(dtype).contiguous()

    @property
    def has_dense(self) -> bool:
        return self._dense is not None

    def keep_int4(self, enabled: bool = True) -> bool:
        """Repack for aten's CPU int4 kernel, used for bf16 activations on the torch backend (False: drop it);
        returns whether the repack is kept (the kernel cannot take every layout: see int4_group)."""
        ok = enabled and self.resolved_backend == "torch" and int4_kernel_available()
        self._int4 = int4_pack(self.packed) if ok and int4_group(self.packed) is not None else None
        return self._int4 is not None

    @property
    def int4_bytes(self) -> int:
        """Bytes the int4 repack takes (0 without one)."""
        return 0 if self._int4 is None else self._int4.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolved_backend == "torch":
            few_rows = self._dense is None or x.numel() <= INT4_ROWS * self.in_features  # decode, not prefill
            if self._int4 is not None and x.dtype == INT4_DTYPE and few_rows:
                return int4_matmul(x, self.packed, self._int4)
            w = self._dense
            if w is not None and w.dtype == x.dtype and w.device == x.device:
                b = self.packed.bias
                return F.linear(x, w, None if b is None else b.to(x.dtype))
        return quant_matmul(x, self.packed, self.resolved_backend)

    def extra_repr(self) -> str:
        layout = "+".join(f"{b}b×{n}" for b, n in self.packed.layout)
        g = self.packed.group_size
        return f"in_features={self.in_features}, out_features={self.out_features}, segments={layout}, group_size={g}"


def can_concat(parts: list[PackedLinear]) -> bool:
    """Whether concat_outputs can join these linears: same input side (features, layout, group size, perm, input
    rotation), zero points and bias on all or none, no output rotation."""
    first = parts[0]

    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

    return all(
        p.in_features == first.in_features
        and p.group_size == first.group_size
        and p.layout == first.layout
        and same(p.perm, first.perm)
        and same(p.had_in, first.had_in)
        and p.had_in_block == first.had_in_block
        and p.had_out is None
        and (p.zeros is None) == (first.zeros is None)
        and (p.bias is None) == (first.bias is None)
        and p.device == first.device
        for p in parts
    )


def fuse(parts: list[QuantLinear]) -> QuantLinear | None:
    """One QuantLinear computing cat([p(x) for p in parts], -1) in one matmul (one kernel launch per segment
    instead of one per part), or None when their layouts differ (e.g. per-matrix bit allocations)."""
    if not all(isinstance(p, QuantLinear) for p in parts):
        return None
    packed = [p.packed for p in parts]
    if not can_concat(packed):
        return None
    fused = QuantLinear(concat_outputs(packed), backend=parts[0].backend)
    fused._resolved = parts[0]._resolved
    return fused


def concat_outputs(parts: list[PackedLinear]) -> PackedLinear:
    """One PackedLinear from slices of output features with the same layout, group size, perm and input rotation
    (no output rotation)."""
    first = parts[0]
    segments = []
    for i, seg in enumerate(first.segments):
        planes = [torch.cat([p.segments[i].planes[j] for p in parts], dim=1) for j in range(len(seg.planes))]
        segments.append(Segment(seg.bits, seg.n_cols, planes))
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts], dim=1)
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    scales = torch.cat([p.scales for p in parts], dim=1)
    n = sum(p.out_features for p in parts)
    return PackedLinear(
        first.in_features, n, first.group_size, segments, scales, zeros, first.perm, bias, first.had_in,
        first.had_in_block,
    )


def gptq_to_packed(
    t: dict[str, torch.Tensor], bits: int, sym: bool, checkpoint_format: str = GPTQ_FORMATS[0], chunk: int | None = None
) -> PackedLinear:
    """from_gptq over slices of output features (multiples of 32), so unpacking never holds a whole layer's codes.

    t holds qweight [K·b/32, N], qzeros [groups, N·b/32], scales [groups, N], g_idx [K] and optionally bias [N].
    """
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    k, n = t["g_idx"].shape[0], qweight.shape[1]
    if chunk is None:
        chunk = max(32, CONVERT_ELEMENTS // max(k, 1) // 32 * 32)
    parts = []
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        if n1 < n and n1 % 32:
            raise QuantkitError(f"GPTQ slices must end at multiples of 32 output features, got {n1}")
        bias = t["bias"][n0:n1] if "bias" in t else None
        zeros = qzeros[:, n0 * bits // 32 : -(-n1 * bits // 32)]
        parts.append(
            from_gptq(qweight[:, n0:n1], zeros, scales[:, n0:n1], t["g_idx"], bits, sym, checkpoint_format, bias)
        )
    return parts[0] if len(parts) == 1 else concat_outputs(parts)
