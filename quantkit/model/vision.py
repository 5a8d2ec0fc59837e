"""The Pixtral vision encoder and the multimodal projector.

Images of different sizes share one sequence: each image is cut into patches by the patch convolution, all
patches are concatenated, and attention is block-diagonal (a patch sees only its own image), computed per image
so no N x N mask is ever built. Positions use 2D RoPE: half the rotary frequencies carry the patch row, half the
column. References: transformers' modeling_pixtral.py and modeling_llava.py, mistral-inference vision_encoder.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model.config import VisionConfig
from quantkit.model.modules import ACTIVATIONS, MLP, RMSNorm, apply_rope, inv_freq

VISION_NORM_EPS = 1e-5  # hard-coded in Pixtral (mistral-inference and transformers alike)


@dataclass
class VisionContext:
    """RoPE tables for all patches and how many patches each image has (the attention blocks)."""

    cos: torch.Tensor  # [N, head_dim]
    sin: torch.Tensor  # [N, head_dim]
    seqlens: list[int]


def vision_context(
    cfg: VisionConfig, grids: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device
) -> VisionContext:
    """2D RoPE for images of grids[i] = (rows, cols) patches: row positions take the even-indexed frequencies,
    column positions the odd-indexed ones (the layout of mistral-inference's precompute_freqs_cis_2d)."""
    freq = inv_freq(cfg.head_dim, cfg.rope_theta).to(device)  # [hd/2]
    rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids])  # [N]
    cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids])  # [N]
    angles = torch.cat([rows[:, None].float() * freq[0::2], cols[:, None].float() * freq[1::2]], dim=-1)  # [N, hd/2]
    emb = torch.cat((angles, angles), dim=-1)  # [N, hd]
    return VisionContext(emb.cos().to(dtype), emb.sin().to(dtype), [h * w for h, w in grids])


class VisionAttention(nn.Module):
    """Multi-head attention without causality, block-diagonal over images."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]
        k = self.k_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]
        v = self.v_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        blocks = zip(q.split(ctx.seqlens, 2), k.split(ctx.seqlens, 2), v.split(ctx.seqlens, 2), strict=True)
        y = torch.cat([F.scaled_dot_product_attention(qi, ki, vi) for qi, ki, vi in blocks], dim=2)  # [B, H, N, hd]
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class VisionLayer(nn.Module):
    """Pre-norm block with Pixtral's names: attention_norm, attention, ffn_norm, feed_forward (SwiGLU)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, VISION_NORM_EPS)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, VISION_NORM_EPS)
        self.feed_forward = MLP(cfg.dim, cfg.ffn_dim, cfg.hidden_act)
        self.kind = "vision"  # a layer kind declared in quantkit/arch/mistral.py

    def attn_block(self, x: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        return x + self.attention(self.attention_norm(x), ctx)  # [1, N, D]

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        return self.mlp_block(self.attn_block(x, ctx))


class VisionTransformer(nn.Module):
    """Only a container, so parameter names match the checkpoint (`transformer.layers.J...`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.n_layers))


class VisionEncoder(nn.Module):
    """Images [C, H, W] of any sizes -> one feature per patch [N, dim], images in order, patches row-major."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_conv = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.dim, VISION_NORM_EPS)
        self.transformer = VisionTransformer(cfg)

    def embed(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, VisionContext]:
        """Patch embeddings of all images [1, N, D] after ln_pre, and their VisionContext (layer-wise entry)."""
        weight = self.patch_conv.weight
        p, c = self.config.patch_size, self.config.channels
        grids = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != c or min(img.shape[1:]) < p:
                raise QuantkitError(f"an image must be [{c}, H, W] with H, W >= {p}; got {list(img.shape)}")
            grids.append(self.patch_conv(img.to(weight.device, weight.dtype)[None])[0])  # [D, h, w]
        h = torch.cat([g.flatten(1).T for g in grids])[None]  # [1, N, D]
        ctx = vision_context(self.config, [tuple(g.shape[1:]) for g in grids], h.dtype, h.device)
        return self.ln_pre(h), ctx

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        h, ctx = self.embed(images)
        for layer in self.transformer.layers:
            h = layer(h, ctx)
        return h[0]  # [N, D]


class Projector(nn.Module):
    """Vision features -> text embedding space: linear_2(act(linear_1(x))), biases optional (none in Pixtral-Large)."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool, act: str = "gelu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
