"""Building blocks shared by the text decoder and the vision encoder, and the linear-layer swap.

Every matmul with a weight goes through an `nn.Linear` submodule called as `self.x_proj(h)`; nothing reads a
linear's `.weight`. That is the contract that lets later code replace linears by name (fake-quant for GPTQ,
packed Triton linears for inference) without this package importing any quantization code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf), as transformers' "gelu" and mistral-inference's nn.GELU()
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply, exactly as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF-layout RoPE pairs dimension i with i + head_dim/2 (the converter permuted q/k rows to this order)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [T, hd] (broadcast over batch and heads)."""
    return x * cos + rotate_half(x) * sin


def inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2], computed in fp32 on the CPU like transformers' init."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)); HF names gate_proj/up_proj/down_proj."""

    def __init__(self, dim: int, ffn_dim: int, act: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by the runtime: gate and up in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def swap_linears(model: nn.Module, factory: Callable[[str, nn.Linear], nn.Module | None]) -> int:
    """Replace each nn.Linear by factory(name, linear) unless it returns None; returns how many were replaced.

    Names are the model's own (`layers.3.self_attn.q_proj`); `ModelConfig.checkpoint_key` maps them to the
    checkpoint's. Works on meta-device models, so a packed model is built without ever allocating float weights.
    """
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    swapped = 0
    for name, linear in targets:
        new = factory(name, linear)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, new)
        swapped += 1
    return swapped
