"""The decode roofline: at batch 1 each new token reads every weight it passes through once, so decoding can be no
faster than memory bandwidth / weight bytes per token. `quantkit run` reports its decode speed as a fraction of that.

Weight bytes are counted from the loaded tensors themselves (packed codes, scales and zeros for a quantized linear),
so the figure holds for float and quantized models alike. KV-cache reads are left out: at the short contexts where
decode speed is quoted they are a small share, and the issue's target is stated in weight bytes.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from quantkit.errors import QuantkitError
from quantkit.model.generate import Generation
from quantkit.model.text import Transformer

BANDWIDTH_ENV = "QUANTKIT_GPU_BANDWIDTH"  # bytes/s, e.g. 3.35e12: overrides the table for every GPU
GPU_BANDWIDTH = (  # (substring of torch.cuda.get_device_name().lower(), spec memory bandwidth in bytes/s); first wins
    ("gh200", 4.0e12),
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),  # 40 GB
    ("l40s", 0.864e12),
    ("a10g", 0.6e12),
    ("rtx 4090", 1.008e12),
    ("rtx 3090", 0.936e12),
)


def device_bandwidth(device: torch.device) -> float | None:
    """Spec memory bandwidth of a CUDA device in bytes/s: QUANTKIT_GPU_BANDWIDTH, else the table; None if unknown."""
    if device.type != "cuda":
        return None
    override = os.environ.get(BANDWIDTH_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if value <= 0:
            raise QuantkitError(
                f"{BANDWIDTH_ENV} must be a positive number of bytes/s (e.g. 3.35e12), got {override!r}"
            )
        return value
    name = torch.cuda.get_device_name(device).lower()
    return next((bw for key, bw in GPU_BANDWIDTH if key in name), None)


def decode_bytes(model: Transformer) -> dict[torch.device, float]:
    """Weight bytes one decode token reads, per device: decoder layers, final norm, lm_head.

    The embedding (one row per token) and the vision tower (prefill only) are left out; a Mixtral layer reads
    top_k of its n_experts experts, so expert weights count at that share.
    """
    t = model.config.text
    share = t.top_k / t.n_experts if t.n_experts else 1.0
    out: dict[torch.device, float] = defaultdict(float)
    for part in ("layers", "norm", "lm_head"):
        for name, tensor in model.get_submodule(part).state_dict(keep_vars=True).items():
            size = tensor.numel() * tensor.element_size()
            out[tensor.device] += size * share if ".experts." in f".{name}" else size
    return dict(out)


def roofline_seconds(model: Transformer) -> float | None:
    """Least time one decode step can take (Σ over devices of bytes there / bandwidth); None off GPU or if unknown."""
    total = 0.0
    for device, size in decode_bytes(model).items():
        bandwidth = device_bandwidth(device)
        if bandwidth is None:
            return None
        total += size / bandwidth
    return total


def roofline_report(model: Transformer, result: Generation) -> dict:
    """Decode speed against the roofline (GPU with a known bandwidth only): {} when it cannot be said."""
    seconds = roofline_seconds(model)
    if seconds is None or seconds <= 0 or result.decode_tokens_per_s <= 0:
        return {}
    return {
        "weight_bytes_per_token": int(sum(decode_bytes(model).values())),
        "roofline_tokens_per_s": round(1 / seconds, 2),
        "roofline_fraction": round(result.decode_tokens_per_s * seconds, 4),
    }
