"""GPTQ -> quantkit format: repack GPTQ checkpoint tensors or an in-memory GPTQResult into a PackedLinear.

GPTQ addresses a column's group through g_idx (desc_act makes it non-monotonic, which other loaders gather per
column at run time). Here the columns are sorted by group once, stably, so every group is contiguous and the sort
becomes the act-order permutation of the activations: the kernels then read scales tile by tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.packed import PackedLinear, pack_linear, stores_perm
from quantkit.quant.pack import gptq_unpack

if TYPE_CHECKING:
    from quantkit.quant.gptq import GPTQResult


def _groups_from_g_idx(g_idx: torch.Tensor, n_groups: int) -> tuple[torch.Tensor | None, int]:
    """(perm making every group contiguous, G) from a GPTQ g_idx [K]; perm None when g_idx is already sorted.

    After a stable sort by group every group must hold G columns except the last, which may hold fewer (padding).
    """
    g = g_idx.to(torch.int64)
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise QuantkitError(f"GPTQ g_idx out of range for {n_groups} groups")
    counts = torch.bincount(g, minlength=n_groups)
    gs = int(counts.max())
    if bool((counts[:-1] != gs).any()) or int(counts[-1]) < 1:
        raise QuantkitError(f"GPTQ g_idx groups have unequal sizes {sorted(set(counts.tolist()))}: cannot repack")
    perm = None if bool((g[1:] >= g[:-1]).all()) else torch.argsort(g, stable=True)
    return perm, gs


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    bias: torch.Tensor | None = None,
) -> PackedLinear:
    """Repack one GPTQ checkpoint linear (docs/format.md "GPTQ export"); a desc_act g_idx becomes perm.

    sym=True requires every zero point to be 2^(bits-1) and stores none.
    """
    q, sc, z, g = gptq_unpack(
        {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, bits, checkpoint_format
    )
    perm, gs = _groups_from_g_idx(g, sc.shape[0])
    zeros = z
    if sym:
        if bool((z != 2 ** (bits - 1)).any()):
            raise QuantkitError(f"sym=True but the GPTQ zero points are not all {2 ** (bits - 1)}")
        zeros = None
    return pack_linear(q, sc, zeros, gs, bits, perm=perm, bias=bias)


def pack_gptq_result(
    result: GPTQResult,
    bits: int | Sequence[tuple[int, int]] | None = None,
    bias: torch.Tensor | None = None,
    had_in: torch.Tensor | None = None,
    had_in_block: int = 0,
) -> PackedLinear:
    """Pack a quantkit.quant.gptq.GPTQResult; perm comes from g_idx, so static_groups results need none.

    bits overrides result.bits (which is already the segment layout when the solver used mixed bits); had_in are
    the signs of the input rotation the result was quantized in.
    """
    perm, gs = _groups_from_g_idx(result.g_idx, result.scales.shape[0])
    k = result.q.shape[1]
    if perm is None and stores_perm(k, result.group_size, result.perm is not None, result.static_groups):
        perm = torch.arange(k)  # act order that kept every group together: stored all the same (stored_bits_for)
    zeros = None if result.sym else result.zeros
    return pack_linear(
        result.q, result.scales, zeros, gs, result.bits if bits is None else bits, perm, bias,
        had_in=had_in, had_in_block=had_in_block,
    )  # fmt: skip
