"""Quantized matmul for the quantkit packed format: Triton kernels on CUDA, a pure-torch reference on CPU.

`quant_matmul(x, pl, backend)` is the one entrance to the kernels (QuantLinear, tests and benchmarks call it):
"triton" runs quantkit.kernels.triton_dequant through its torch custom op (so torch.compile traces the same call
that runs eagerly; on CPU tensors only under TRITON_INTERPRET=1, for tests), "torch" runs
quantkit.kernels.reference, "auto" picks Triton for CUDA tensors when Triton imports and the reference otherwise.
Triton is imported only when the Triton backend is used.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear
from quantkit.kernels.reference import reference_matmul

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_backend(backend: str) -> str:
    """backend, refused unless one of BACKENDS (the one place that checks the name)."""
    if backend not in BACKENDS:
        raise QuantkitError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on device; refuses a Triton request that cannot run there."""
    check_backend(backend)
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if backend == "triton":
        if not has_triton:
            raise QuantkitError("backend 'triton' requested but Triton is not installed")
        if device.type != "cuda" and not interpreter_enabled():
            raise QuantkitError(f"backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 (or a CUDA GPU)")
    return backend


def quant_matmul(x: torch.Tensor, pl: PackedLinear, backend: str = "auto") -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ + bias with W the dequantized packed weight; y has x's dtype.

    backend is resolved here unless it already is "triton" or "torch" (QuantLinear resolves it once per device).
    """
    if backend not in ("triton", "torch"):
        backend = resolve_backend(backend, x.device)
    if backend == "torch":
        return reference_matmul(x, pl)
    from quantkit.kernels import triton_dequant

    return triton_dequant.quant_linear(x, pl)


__all__ = ["BACKENDS", "check_backend", "interpreter_enabled", "quant_matmul", "reference_matmul", "resolve_backend"]
