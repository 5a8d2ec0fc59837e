"""QuantLinear: an nn.Module holding one PackedLinear as buffers, so state_dict() is the quantkit format itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantkit.formats.packed import PackedLinear, from_tensors, to_tensors
from quantkit.kernels import BACKENDS, quant_matmul


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear with packed weights; `backend` is "auto", "triton" or "torch" (see quant_matmul).

    Buffer names are the format's tensor suffixes (qmeta, segments, seg0_w4, scales, ...), so a module at
    `layers.0.mlp.up_proj` saves and loads exactly the tensors `to_tensors(pl, "layers.0.mlp.up_proj")` names.
    Moving the module (.to / .cuda / .half) changes the device only: codes, fp16 scales and zero points keep their
    dtypes, since a cast would corrupt them.
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
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.packed, backend=self.backend)

    def extra_repr(self) -> str:
        layout = "+".join(f"{b}b×{n}" for b, n in self.packed.layout)
        g = self.packed.group_size
        return f"in_features={self.in_features}, out_features={self.out_features}, segments={layout}, group_size={g}"
