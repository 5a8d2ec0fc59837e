"""The EXL3 linear in plain torch: the stored trellis decoded once (formats/exl3.py's reference decoder) into a
dense weight in the model's dtype, then an ordinary matmul. The Triton decode-GEMV and dequantize kernels of
issue 27 replace the decode and the matmul; until then this is the CPU path and their reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import exl3


class Exl3Linear(nn.Module):
    """y = x Wᵀ with W [out, in] decoded from `trellis`, `suh` and `svh` (stored padded to multiples of 128, as
    exllamav3 stores them; the padding is cut away after decoding)."""

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, codebook: str):
        super().__init__()
        self.out_features, self.in_features, self.codebook = out_features, in_features, codebook
        for name in ("trellis", "suh", "svh"):
            self.register_buffer(name, tensors[name])
        self.register_buffer("bias", tensors.get("bias"))
        self._dense: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in]."""
        w = exl3.decode_weight(self.trellis, self.suh, self.svh, self.codebook)
        return w.T[: self.out_features, : self.in_features].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._dense, None if self.bias is None else self.bias.to(x.dtype))

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None  # new tensors: decode again on the next forward
        super()._load_from_state_dict(*args, **kwargs)
