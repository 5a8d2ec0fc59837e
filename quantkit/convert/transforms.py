"""Named tensor transforms applied on the way from native to HF. There is exactly one numeric one: rotary."""

from __future__ import annotations

import torch


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native interleaved-pair rotary (2i, 2i+1) -> HF rotate_half pairing (i, i + hd/2), per head.

    A pure reorder of the output rows of wq / wk: [n_heads*hd, in] -> same shape, no arithmetic, so it is
    exact in any dtype. Use the kv head count for wk and the vision head count for the vision tower.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
