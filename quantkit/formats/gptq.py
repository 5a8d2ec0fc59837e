"""The GPTQ checkpoint layout (`checkpoint_format: "gptq"`), both directions: GPTQ tensors from codes and grids
(export), and GPTQ tensors or an in-memory solver result repacked into the quantkit format (import).

Mixed-bit folders carry GPTQModel's `dynamic` field in quantization_config: {"+:REGEX": {"bits": b}} overrides
and {"-:REGEX": {}} exclusions, decided per module name by the first rule whose regex re.match-es it (the rule
vLLM and GPTQModel apply; dynamic_override). quantkit reads per-module bits the same way (module_bits).

GPTQ addresses a column's group through g_idx (desc_act makes it non-monotonic, which other loaders gather per
column at run time). On import the columns are sorted by group once, stably, so every group is contiguous and the
sort becomes the act-order permutation of the activations: the kernels then read scales tile by tile. The exact
GPTQ tensors are specified in docs/format.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.bits import pack_bits, unpack_bits
from quantkit.formats.packed import PackedLinear, pack_linear, stores_perm

GPTQ_BITS = (2, 3, 4, 8)  # widths the GPTQ checkpoint format defines (and its kernels load)
GPTQ_FORMATS = ("gptq", "gptq_v2")  # v1 ("gptq") stores zero − 1 per field; GPTQModel's internal v2 the true zero


class SolverResult(Protocol):
    """What pack_gptq_result reads of a GPTQ solver result (quant.gptq.GPTQResult)."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    bits: int | list[tuple[int, int]]
    group_size: int | None
    sym: bool
    static_groups: bool


def dequantize_gptq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [out, in] fp32 = scales[g_idx]ᵀ · (q − zeros[g_idx]ᵀ), the GPTQ dequantization rule."""
    g = g_idx.long()
    s = scales.float()[g].T  # [out, in]
    z = zeros.float()[g].T  # [out, in]
    return s * (q.float() - z)


def _check_gptq(bits: int, fmt: str) -> None:
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"the GPTQ checkpoint format has {'/'.join(map(str, GPTQ_BITS))}-bit layouts, not {bits}")
    if fmt not in GPTQ_FORMATS:
        raise QuantkitError(f"unknown GPTQ checkpoint format {fmt!r} (expected one of {', '.join(GPTQ_FORMATS)})")


def gptq_pack(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """Codes q [out, in], scales/zeros [n_groups, out], g_idx [in] -> the GPTQ tensors of one linear.

    Returns {"qweight": int32 [in·bits/32, out], "qzeros": int32 [n_groups, out·bits/32],
    "scales": fp16 [n_groups, out], "g_idx": int32 [in]}. in and out must be multiples of 32 (the loaders size
    their buffers as features // 32 · bits). In v1 each zero field holds (zero − 1) mod 2^bits.
    """
    _check_gptq(bits, checkpoint_format)
    n_out, n_in = q.shape
    if n_in % 32 or n_out % 32:
        raise QuantkitError(f"GPTQ export needs in and out features divisible by 32, got [{n_out}, {n_in}]")
    if scales.shape != zeros.shape or scales.shape[1] != n_out or g_idx.shape != (n_in,):
        raise QuantkitError("GPTQ export: scales/zeros must be [n_groups, out] and g_idx [in]")
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) & (2**bits - 1)
    return {
        "qweight": pack_bits(q.T, bits, dim=0),
        "qzeros": pack_bits(z, bits, dim=1),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def gptq_unpack(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors of one linear -> (q [out, in], scales fp16 [n_groups, out], zeros [n_groups, out], g_idx [in])."""
    _check_gptq(bits, checkpoint_format)
    q = unpack_bits(tensors["qweight"], bits, dim=0).T.contiguous()  # [out, in]
    zeros = unpack_bits(tensors["qzeros"], bits, dim=1)  # [n_groups, out]
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & (2**bits - 1)
    return q, tensors["scales"], zeros, tensors["g_idx"]


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
    result: SolverResult,
    bits: int | Sequence[tuple[int, int]] | None = None,
    bias: torch.Tensor | None = None,
    had_in: torch.Tensor | None = None,
    had_in_block: int = 0,
) -> PackedLinear:
    """Pack a GPTQ solver result (quant.gptq.GPTQResult); perm comes from g_idx, so static_groups results need none.

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


def gptq_stored_bits(out_features: int, in_features: int, bits: int, group_size: int | None) -> int:
    """Bits of the tensors gptq_pack writes for one linear: qweight, qzeros, fp16 scales and int32 g_idx."""
    n_groups = in_features // (group_size or in_features)
    return out_features * in_features * bits + n_groups * out_features * (bits + 16) + 32 * in_features


def dynamic_override(dynamic: dict | None, name: str) -> dict | bool | None:
    """The `dynamic` rule deciding module `name`: False when a "-:" rule matches first (the module stays 16-bit),
    the overrides dict of the first matching "+:" (or unprefixed) rule, None when no rule matches.

    As vLLM's gptq_utils.get_dynamic_override and GPTQModel's dynamic_get: rules in order, re.match (anchored at
    the start only), first match wins."""
    for key, overrides in (dynamic or {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return False
        elif re.match(key.removeprefix("+:"), name):
            return overrides
    return None


def module_bits(qcfg: dict, name: str) -> int | None:
    """The bits of GPTQ module `name` under quantization_config qcfg (its `dynamic` rules, else `bits`); None when
    a negative rule leaves it 16-bit."""
    o = dynamic_override(qcfg.get("dynamic"), name)
    if o is False:
        return None
    return int((o or {}).get("bits", qcfg["bits"]))


def module_sym(qcfg: dict, name: str) -> bool:
    """Whether GPTQ module `name` has a symmetric grid: its `dynamic` rule's "sym" (GPTQModel and vLLM read it per
    module too), else the folder's."""
    o = dynamic_override(qcfg.get("dynamic"), name)
    return bool((o or {}).get("sym", qcfg.get("sym", True)))


def check_dynamic(dynamic) -> None:
    """Refuse a `dynamic` field that is not {rule: {...}} with valid regexes and GPTQ widths."""
    if dynamic is None:
        return
    if not isinstance(dynamic, dict):
        raise QuantkitError(f"quantization_config.dynamic must be a JSON object, not {type(dynamic).__name__}")
    for key, overrides in dynamic.items():
        if not isinstance(overrides, dict):
            raise QuantkitError(f"quantization_config.dynamic[{key!r}] must be a JSON object")
        try:
            re.compile(key[2:] if key.startswith(("+:", "-:")) else key)
        except re.error as e:
            raise QuantkitError(f"quantization_config.dynamic: bad regex {key!r}: {e}") from None
        if "bits" in overrides and overrides["bits"] not in GPTQ_BITS:
            raise QuantkitError(f"quantization_config.dynamic[{key!r}]: bits {overrides['bits']} is not a GPTQ width")
        if "sym" in overrides and not isinstance(overrides["sym"], bool):
            raise QuantkitError(f"quantization_config.dynamic[{key!r}]: sym must be true or false")
