"""QuantLinear: an nn.Module holding one PackedLinear as buffers, so state_dict() is the quantkit format itself.

GPTQLinear loads a GPTQ-format linear (qweight, qzeros, scales, g_idx) and repacks itself into a QuantLinear as soon
as its tensors arrive, so GPTQ checkpoints run through the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.gptq import from_gptq
from quantkit.formats.packed import PackedLinear, Segment, dequantize, from_tensors, to_tensors
from quantkit.kernels import BACKENDS, reference_matmul, resolve_backend

CONVERT_ELEMENTS = 1 << 24  # weights repacked per slice of a GPTQ linear: bounds the conversion's scratch memory


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with packed weights; `backend` is "auto", "triton" or "torch" (see quant_matmul).

    Buffer names are the format's tensor suffixes (qmeta, segments, seg0_w4, scales, ...), so a module at
    `layers.0.mlp.up_proj` saves and loads exactly the tensors `to_tensors(pl, "layers.0.mlp.up_proj")` names.
    Moving the module (.to / .cuda / .half) changes the device only: codes, fp16 scales and zero points keep their
    dtypes, since a cast would corrupt them.

    The backend is resolved once per device (not on every forward). On the torch backend, `keep_dense(dtype)` keeps
    the dequantized weight next to the codes, so a forward is one F.linear instead of a dequantization: that is what
    makes CPU decoding as fast as the float model (the caller decides whether the memory is there; see
    quantkit.runtime.keep_dequantized).
    """

    def __init__(self, packed: PackedLinear, backend: str = "auto") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        self.backend = backend
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        for name, t in to_tensors(packed).items():
            self.register_buffer(name, t)
        self._packed: PackedLinear | None = None
        self._resolved: str | None = None
        self._dense: torch.Tensor | None = None

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
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None
        self._dense = None

    def set_backend(self, backend: str) -> None:
        """Switch backend ("auto", "triton", "torch"); resolved against the buffers' device right away."""
        if backend not in BACKENDS:
            raise QuantkitError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        self.backend = backend
        self._resolved = resolve_backend(backend, self.scales.device)
        if self._resolved != "torch":
            self._dense = None

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolved_backend == "torch":
            w = self._dense
            if w is not None and w.dtype == x.dtype and w.device == x.device:
                b = self.packed.bias
                return F.linear(x, w, None if b is None else b.to(x.dtype))
            return reference_matmul(x, self.packed)
        from quantkit.kernels.triton_dequant import quant_linear, triton_matmul

        if torch.compiler.is_compiling():  # the custom op traces; called eagerly it would only add dispatch cost
            return quant_linear(x, self.packed)
        return triton_matmul(x, self.packed)

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
    if not all(isinstance(p, QuantLinear) and not getattr(p, "pending", False) for p in parts):
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
    t: dict[str, torch.Tensor], bits: int, sym: bool, checkpoint_format: str = "gptq", chunk: int | None = None
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


class GPTQLinear(QuantLinear):
    """A GPTQ-format linear that becomes a QuantLinear the moment its checkpoint tensors are loaded into it.

    Built (e.g. on the meta device) with buffers shaped like the GPTQ tensors, so a checkpoint part loads into it as
    into any module; loading then repacks it (gptq_to_packed, slice by slice) into the quantkit format's buffers and
    frees the GPTQ ones. Converting per linear as it loads keeps memory bounded by one linear, never a whole model.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        bits: int,
        sym: bool,
        checkpoint_format: str = "gptq",
        backend: str = "auto",
        prefix: str = "",
    ) -> None:
        nn.Module.__init__(self)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
        missing = {"qweight", "qzeros", "scales", "g_idx"} - set(tensors)
        if missing:
            raise QuantkitError(f"{prefix}: GPTQ tensors {', '.join(sorted(missing))} are missing")
        self.backend, self.prefix = backend, prefix
        self.bits, self.sym, self.checkpoint_format = bits, sym, checkpoint_format
        self.in_features, self.out_features = tensors["g_idx"].shape[0], tensors["qweight"].shape[1]
        if tensors["qweight"].shape[0] * 32 != self.in_features * bits:
            raise QuantkitError(
                f"{prefix}: qweight {list(tensors['qweight'].shape)} does not hold {self.in_features} {bits}-bit rows"
            )
        for key, t in tensors.items():
            self.register_buffer(key, t)
        self._packed = None
        self._resolved = None
        self._dense = None
        self.pending = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        buffers = dict(self.named_buffers(recurse=False))
        if not self.pending or any(b.is_meta for b in buffers.values()):
            return
        try:
            packed = gptq_to_packed(buffers, self.bits, self.sym, self.checkpoint_format)
        except QuantkitError as e:
            raise QuantkitError(f"{self.prefix}: {e}") from None
        for key in buffers:
            delattr(self, key)
        for key, t in to_tensors(packed).items():
            self.register_buffer(key, t.to(packed.device))
        self.pending = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending:
            raise QuantkitError(f"{self.prefix}: GPTQ linear used before its tensors were loaded")
        return super().forward(x)
