"""The Mistral / Mixtral decoder, and the top-level model that Pixtral extends with a vision tower and projector.

Module names mirror the HF checkpoint (`layers.3.self_attn.q_proj`, `layers.3.block_sparse_moe.experts.5.w1`);
`ModelConfig.checkpoint_key` adds the `model.` / `language_model.` prefixes. The layer-wise path the quantizer
uses is the one `forward` uses: embed -> layer(h, ctx) for each layer -> head, with one LayerContext (RoPE
cos/sin and mask) per forward. References: transformers' modeling_mistral/mixtral/llava, gpt-fast model.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model.config import ModelConfig, TextConfig
from quantkit.model.modules import MLP, RMSNorm, apply_rope, inv_freq
from quantkit.model.vision import Projector, VisionEncoder


@dataclass
class LayerContext:
    """What each decoder layer needs besides hidden states, computed once per forward.

    Queries are positions [start, start + T); keys are positions [key_start, start + T), from the KV cache when
    one is set up, else the T current tokens (then start must be 0). key_start > 0 only with a sliding window.
    """

    start: int
    cos: torch.Tensor  # [T, head_dim]
    sin: torch.Tensor  # [T, head_dim]
    key_start: int
    mask: torch.Tensor | None  # [T, S] bool, True = may attend; None: is_causal, or one query seeing every key
    is_causal: bool
    _moved: dict = field(default_factory=dict, repr=False)
    pos: torch.Tensor | None = None  # static decode: positions [T] on the device; keys are the whole cache
    slots: torch.Tensor | None = None  # PagedKVCache: where each new token's k, v go [B * T] (block * size + offset)
    table: torch.Tensor | None = None  # PagedKVCache: each row's blocks in position order [B, n_blocks]

    def on(self, device: torch.device) -> LayerContext:
        """The same context on another device (layers split across GPUs); copies are made once and kept."""
        if self.cos.device == device:
            return self
        if device not in self._moved:
            mask = None if self.mask is None else self.mask.to(device)
            pos = None if self.pos is None else self.pos.to(device)
            slots = None if self.slots is None else self.slots.to(device)
            table = None if self.table is None else self.table.to(device)
            moved = replace(self, cos=self.cos.to(device), sin=self.sin.to(device), mask=mask, pos=pos, slots=slots,
                            table=table, _moved={})  # fmt: skip
            self._moved[device] = moved
        return self._moved[device]


def layer_context(cfg: TextConfig, start: int, length: int, dtype: torch.dtype, device: torch.device) -> LayerContext:
    """RoPE tables and the causal (optionally sliding-window) mask for queries at positions [start, start+length)."""
    pos = torch.arange(start, start + length, device=device)  # [T]
    freqs = pos[:, None].float() * inv_freq(cfg.head_dim, cfg.rope_theta).to(device)  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    window = cfg.sliding_window
    key_start = 0 if window is None else max(0, start - window + 1)
    mask, causal = None, False
    if length > 1:
        if start == 0 and (window is None or length <= window):
            causal = True
        else:
            keys = torch.arange(key_start, start + length, device=device)[None, :]  # [1, S]
            mask = keys <= pos[:, None]  # [T, S]
            if window is not None:
                mask &= keys > pos[:, None] - window
    return LayerContext(start, emb.cos().to(dtype), emb.sin().to(dtype), key_start, mask, causal)


def static_context(
    cfg: TextConfig, pos: torch.Tensor, inv_freqs: torch.Tensor, cache_len: int, dtype: torch.dtype
) -> LayerContext:
    """The context of queries at device positions pos [T] attending over a whole KV cache of cache_len slots.

    Everything is computed on pos's device from tensors, never from Python ints, so a decode step built on it
    has fixed shapes and no host sync and can be captured once (CUDA graphs) and replayed at every position.
    """
    freqs = pos[:, None].float() * inv_freqs  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    keys = torch.arange(cache_len, device=pos.device)[None, :]  # [1, S]
    mask = keys <= pos[:, None]  # [T, S]
    if cfg.sliding_window is not None:
        mask &= keys > pos[:, None] - cfg.sliding_window
    return LayerContext(0, emb.cos().to(dtype), emb.sin().to(dtype), 0, mask, False, pos=pos)


def batch_context(
    cfg: TextConfig, pos: torch.Tensor, inv_freqs: torch.Tensor, key_len: int, dtype: torch.dtype
) -> LayerContext:
    """One decode query per batch row, at its own position pos [B] (batched decode of requests of different
    lengths). Keys are cache positions [0, key_len); each row's mask hides what it has not
    written (or has slid out of its window), so rows of any length share one attention call.
    """
    freqs = pos[:, None].float() * inv_freqs  # [B, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [B, 1, 1, hd]: broadcasts over heads
    keys = torch.arange(key_len, device=pos.device)[None, :]  # [1, S]
    mask = keys <= pos[:, None]  # [B, S]
    if cfg.sliding_window is not None:
        mask &= keys > pos[:, None] - cfg.sliding_window
    return LayerContext(0, emb.cos().to(dtype), emb.sin().to(dtype), 0, mask[:, None, None, :], False, pos=pos)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: [batch, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        # zeroed: the static decode step multiplies unwritten slots by a zero attention weight (NaN garbage would
        # survive that); the eager path reads only written slots
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, ctx: LayerContext, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, hd] at ctx.start; return the visible keys and values [B, KV, S, hd].

        With device positions (ctx.pos, static decode) they are written there and the whole cache is returned
        (ctx.mask hides the slots not written yet).
        """
        b, _, t, _ = k.shape
        if ctx.pos is not None:
            self.k[:b].index_copy_(2, ctx.pos, k)
            self.v[:b].index_copy_(2, ctx.pos, v)
            return self.k[:b], self.v[:b]
        end = ctx.start + t
        if end > self.k.shape[2]:
            raise QuantkitError(f"KV cache holds {self.k.shape[2]} positions; position {end - 1} does not fit")
        self.k[:b, :, ctx.start : end] = k
        self.v[:b, :, ctx.start : end] = v
        return self.k[:b, :, ctx.key_start : end], self.v[:b, :, ctx.key_start : end]


class PagedKVCache(nn.Module):
    """One layer's keys and values in blocks of `block` positions that the requests of a batch share:
    [n_blocks, block, kv_heads, head_dim]. A request holds a list of blocks (its table); its position p lives in
    block table[p // block] at offset p % block, so memory follows the tokens requests really hold and a block a
    request frees serves the next one. Grown (never past the budget the caller keeps) with grow()."""

    def __init__(self, n_blocks: int, block: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (n_blocks, block, kv_heads, head_dim)
        # zeroed: masked slots are multiplied by a zero attention weight, which NaN garbage would survive
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[0]

    def grow(self, n_blocks: int) -> None:
        """Hold n_blocks blocks, keeping what is written (a new tensor, then the copy: one layer at a time, so
        the transient is one layer's old cache)."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(n_blocks, *old.shape[1:])
            n = min(n_blocks, old.shape[0])
            new[:n] = old[:n]
            setattr(self, name, new)

    def update(self, ctx: LayerContext, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, hd] to ctx.slots; return each row's keys and values [B, KV, S, hd] gathered from
        its blocks: positions [key_start, start + T) for a prefill chunk (B = 1), [0, mask width) for a decode
        step (ctx.pos set; the mask hides what a row has not written)."""
        b, kv, t, hd = k.shape
        for cache, new in ((self.k, k), (self.v, v)):
            cache.view(-1, kv, hd).index_copy_(0, ctx.slots, new.transpose(1, 2).reshape(b * t, kv, hd))
        lo, hi = (0, ctx.mask.shape[-1]) if ctx.pos is not None else (ctx.key_start, ctx.start + t)
        keys, values = (c[ctx.table].flatten(1, 2)[:, lo:hi].transpose(1, 2) for c in (self.k, self.v))
        return keys, values


class Attention(nn.Module):
    """Grouped-query attention with RoPE; uses the KV cache when one is attached (generation)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # set by the runtime: q, k, v in one matmul (q/k/v_proj then None)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            kv = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(ctx, k, v)  # [B, KV, S, hd]
        elif ctx.start != 0:
            raise ValueError("without a KV cache, a forward must start at position 0")
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Expert(nn.Module):
    """One Mixtral expert, with the checkpoint's names: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral's MoE: top-k experts per token, weighted by the softmax over the k selected router logits.

    Each expert is called only on the tokens routed to it, so hooks on an expert's linears see exactly its
    tokens (what per-expert GPTQ Hessians need).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.ffn_dim) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])  # [N, D]
        probs = torch.softmax(self.gate(h).float(), dim=-1)  # [N, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)  # = softmax over the k selected logits
        out = torch.zeros_like(h)  # [N, D]
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # [n_e]
            if token.numel() == 0:
                continue
            y = expert(h[token]) * weights[token, slot, None]  # [n_e, D]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view_as(x)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)) (dense `mlp` or Mixtral's `block_sparse_moe`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.n_experts > 0
        self.kind = "moe" if self.is_moe else "dense"  # a layer kind declared in quantkit/arch/mistral.py
        if self.is_moe:
            self.block_sparse_moe = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg.dim, cfg.ffn_dim, cfg.hidden_act)

    def attn_block(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """x + attention(norm(x)): the first half (measurement runs the halves one at a time)."""
        return x + self.self_attn(self.input_layernorm(x), ctx)  # [B, T, D]

    def mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        """h + mlp(norm(h)): the second half (dense MLP or sparse MoE)."""
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return h + ffn(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.mlp_block(self.attn_block(x, ctx))


class Transformer(nn.Module):
    """Mistral, Mixtral, or Pixtral (text decoder plus `vision_tower` and `multi_modal_projector`).

    Layer-wise use (the quantizer): h = embed(ids, images); ctx = context(0, T, h); h = layers[i](h, ctx) for
    each i; logits = head(h). `forward` is exactly that loop (with the KV cache during generation).
    Layers may sit on different devices: hidden states follow each layer's device.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = config.text
        # from_pretrained skips the random init, whose meta-device path imports torch._dynamo (~200 MB of RSS)
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(t.vocab_size, t.dim))
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.n_layers))
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.lm_head = nn.Linear(t.dim, t.vocab_size, bias=False)
        self.vision_tower: VisionEncoder | None = None
        self.multi_modal_projector: Projector | None = None
        if config.vision is not None:
            self.vision_tower = VisionEncoder(config.vision)
            self.multi_modal_projector = Projector(
                config.vision.dim, t.dim, config.projector_bias, config.projector_act
            )

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images [3, H, W] (any sizes, normalized) -> projected features [sum of patches, dim]."""
        if self.vision_tower is None or self.multi_modal_projector is None:
            raise QuantkitError("this model has no vision encoder: images are not supported")
        return self.multi_modal_projector(self.vision_tower(images))

    def embed(
        self,
        input_ids: torch.Tensor,
        images: Sequence[torch.Tensor] | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D], with image features placed at the image-token positions, in order.

        features [N, D] may be given instead of images (e.g. computed layer by layer by the quantizer).
        """
        device = self.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        h = self.embed_tokens(input_ids)  # [B, T, D]
        if images:
            features = self.image_features(images)  # [N, D]
        if features is not None:
            slots = input_ids == self.config.image_token_id  # [B, T]
            n_slots = int(slots.sum())
            if n_slots != features.shape[0]:
                raise QuantkitError(f"the prompt has {n_slots} image tokens but the images give {features.shape[0]}")
            h = h.masked_scatter(slots[..., None], features.to(device, h.dtype))
        return h

    def context(self, start: int, h: torch.Tensor) -> LayerContext:
        """The LayerContext for hidden states h [B, T, D] whose first token sits at position start."""
        return layer_context(self.config.text, start, h.shape[1], h.dtype, h.device)

    def run_layers(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """All decoder layers on h [B, T, D] at positions [start, start + T)."""
        ctx = self.context(start, h)
        for layer in self.layers:
            device = layer.input_layernorm.weight.device
            h = layer(h.to(device), ctx.on(device))
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: [B, T, D] -> logits [B, T, vocab]."""
        return self.lm_head(self.norm(h.to(self.norm.weight.device)))

    def forward(
        self, input_ids: torch.Tensor, images: Sequence[torch.Tensor] | None = None, start: int = 0
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for input_ids [B, T] at positions [start, start + T)."""
        return self.head(self.run_layers(self.embed(input_ids, images), start))

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Attach a preallocated KV cache to every layer, on that layer's device."""
        for layer in self.layers:
            w = layer.input_layernorm.weight
            t = self.config.text
            layer.self_attn.kv_cache = KVCache(batch, t.n_kv_heads, max_len, t.head_dim, dtype or w.dtype, w.device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
