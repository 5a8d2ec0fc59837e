"""The EXL3 linear. On the torch backend (CPU): the stored trellis decoded once (formats/exl3.py's reference
decoder) into a dense weight in the model's dtype, then an ordinary matmul; it is the Triton path's reference. On
the Triton backend (a GPU, or Triton's interpreter): nothing dense is kept; up to 16 rows (a decode step) run
kernels/exl3_triton.py's GEMV, which decodes the tiles in registers with both Hadamard transforms fused, and more
rows (a prefill) decode Ŵ to the input's dtype for one tensor-core matmul between the two Hadamard transforms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import exl3
from quantkit.kernels import check_backend, resolve_backend


class Exl3Linear(nn.Module):
    """y = x Wᵀ with W [out, in] decoded from `trellis`, `suh` and `svh` (stored padded to multiples of 128, as
    exllamav3 stores them; the padding is cut away after decoding)."""

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, codebook: str):
        super().__init__()
        self.out_features, self.in_features, self.codebook = out_features, in_features, codebook
        for name in ("trellis", "suh", "svh", *(n for n in exl3.FLAGS if n in tensors)):
            self.register_buffer(name, tensors[name])  # the codebook's flag too: the folder's tensors, all used
        self.register_buffer("bias", tensors.get("bias"))
        self._dense: torch.Tensor | None = None
        self.backend, self._resolved = "auto", None

    def set_backend(self, backend: str) -> None:
        """Switch backend ("auto", "triton", "torch"), resolved against the buffers' device right away."""
        self.backend = check_backend(backend)
        self._resolved = resolve_backend(backend, self.trellis.device)
        if self._resolved != "torch":
            self._dense = None

    def dequantize(self) -> torch.Tensor:
        """fp32 [out, in]."""
        w = exl3.decode_weight(self.trellis, self.suh, self.svh, self.codebook)
        return w.T[: self.out_features, : self.in_features].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._resolved is None:
            self._resolved = resolve_backend(self.backend, self.trellis.device)
        if self._resolved == "triton":
            return self._triton(x)
        if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
            self._dense = self.dequantize().to(device=x.device, dtype=x.dtype)
        return F.linear(x, self._dense, None if self.bias is None else self.bias.to(x.dtype))

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit.kernels import exl3_triton

        rows = x.reshape(-1, x.shape[-1])
        n_in = self.trellis.shape[0] * exl3.TILE
        if n_in > self.in_features:
            rows = F.pad(rows, (0, n_in - self.in_features))  # the padded inputs meet zero-weight rows
        if rows.shape[0] <= exl3_triton.GEMV_ROWS:
            y = exl3_triton.gemv(rows, self.trellis, self.suh, self.svh, self.codebook)
        else:
            w_hat = exl3_triton.decode_inner(self.trellis, self.codebook, dtype=x.dtype)
            xh = exl3.blocked_hadamard(rows.float() * self.suh.float(), 1).to(x.dtype)
            y = exl3.blocked_hadamard((xh @ w_hat).float(), 1) * self.svh.float()
        y = y[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None  # new tensors: decode again on the next forward
        super()._load_from_state_dict(*args, **kwargs)
