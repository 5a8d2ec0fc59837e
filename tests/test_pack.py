"""Bit packing round trips, and the GPTQ export checked against docs/format.md with independent bit arithmetic."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.bits import pack_bits, unpack_bits
from quantkit.formats.gptq import dequantize_gptq as dequantize
from quantkit.formats.gptq import gptq_pack, gptq_unpack
from quantkit.quant.gptq import HessianAccumulator, gptq_quantize, rtn_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _codes(shape, bits, seed=0):
    return torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_every_width(bits):
    for dim, shape in ((0, (64, 5)), (1, (3, 96)), (-1, (2, 3, 160)), (1, (2, 32, 3))):
        codes = _codes(shape, bits, seed=bits)
        packed = pack_bits(codes, bits, dim=dim)
        assert packed.dtype == torch.int32
        assert packed.shape[dim] == shape[dim] * bits // 32
        assert torch.equal(unpack_bits(packed, bits, dim=dim), codes.to(torch.int32))
    # extremes: all ones must survive the signed int32 container
    ones = torch.full((32, 2), 2**bits - 1)
    assert torch.equal(unpack_bits(pack_bits(ones, bits), bits), ones.to(torch.int32))


def _stream_unpack(words, bits, n):
    """Independent reading of the layout: words -> one Python int, LSB first -> n codes."""
    stream = 0
    for i, w in enumerate(words):
        stream |= (int(w) & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (k * bits)) & (2**bits - 1) for k in range(n)]


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_straddling_widths_are_one_bitstream(bits):
    codes = _codes((64, 2), bits, seed=7)
    packed = pack_bits(codes, bits, dim=0)  # [64 * bits / 32, 2]
    for col in range(2):
        assert _stream_unpack(packed[:, col].tolist(), bits, 64) == codes[:, col].tolist()


def test_pack_errors():
    with pytest.raises(QuantkitError, match="multiple of 32"):
        pack_bits(_codes((48, 2), 3), 3)
    with pytest.raises(QuantkitError, match="multiple of 8"):
        pack_bits(_codes((12, 2), 4), 4)
    with pytest.raises(QuantkitError, match="out of range"):
        pack_bits(torch.full((32,), 16), 4)
    with pytest.raises(QuantkitError, match="int32"):
        unpack_bits(torch.zeros(4, dtype=torch.int64), 4)


def _result(bits, group_size, act_order=False, sym=True, n_out=64, n_in=256):
    g = torch.Generator().manual_seed(bits)
    X = torch.randn(512, 16, generator=g) @ torch.randn(16, n_in, generator=g) + torch.randn(512, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g) * 0.02
    acc = HessianAccumulator(n_in)
    acc.add(X)
    return gptq_quantize(W, acc.hessian(), bits, group_size=group_size, sym=sym, act_order=act_order)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_export_round_trip(bits, group_size, fmt):
    res = _result(bits, group_size, act_order=group_size == 64, sym=group_size != 128)
    t = gptq_pack(res.q, res.scales, res.zeros, res.g_idx, bits, checkpoint_format=fmt)
    n_out, n_in = res.q.shape
    n_groups = 1 if group_size is None else n_in // group_size
    assert t["qweight"].shape == (n_in * bits // 32, n_out) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (n_groups, n_out * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (n_groups, n_out) and t["scales"].dtype == torch.float16
    assert t["g_idx"].shape == (n_in,) and t["g_idx"].dtype == torch.int32
    q, scales, zeros, g_idx = gptq_unpack(t, bits, checkpoint_format=fmt)
    assert torch.equal(q, res.q.to(torch.int32))
    assert torch.equal(zeros, res.zeros.to(torch.int32))
    assert torch.equal(g_idx, res.g_idx)
    # what a loader computes from the file is exactly the solver's dequantized weight
    assert torch.equal(dequantize(q, scales, zeros, g_idx), res.weight)


def test_gptq_4bit_layout_by_hand():
    """docs/format.md, 4-bit: qweight[r, o] holds q[o, 8r + k] in bits 4k..4k+3; qzeros field k = zero − 1."""
    res = _result(4, 32, act_order=True, sym=False)
    t = gptq_pack(res.q, res.scales, res.zeros, res.g_idx, 4)
    qw = t["qweight"].tolist()
    for r in range(0, len(qw), 5):
        for o in range(0, len(qw[0]), 3):
            word = qw[r][o] & 0xFFFFFFFF
            for k in range(8):
                assert (word >> (4 * k)) & 0xF == int(res.q[o, 8 * r + k])
    qz = t["qzeros"].tolist()
    for g in range(len(qz)):
        for w in range(len(qz[0])):
            word = qz[g][w] & 0xFFFFFFFF
            for k in range(8):
                assert (word >> (4 * k)) & 0xF == (int(res.zeros[g, 8 * w + k]) - 1) % 16
    assert torch.equal(t["scales"].float(), res.scales)
    # dequantize with the stored g_idx the way every GPTQ loader does (per input column)
    n_in, n_out = 256, 64
    field = lambda word, k: ((word & 0xFFFFFFFF) >> (4 * k)) & 0xF  # noqa: E731
    codes = torch.tensor([[field(qw[i // 8][o], i % 8) for o in range(n_out)] for i in range(n_in)])  # [in, out]
    zeros = torch.tensor([[(field(row[o // 8], o % 8) + 1) % 16 for o in range(n_out)] for row in qz])  # [groups, out]
    g = t["g_idx"].long()
    deq = t["scales"].float()[g] * (codes - zeros[g]).float()  # [in, out]
    assert torch.equal(deq.T, res.weight)


def test_gptq_3bit_words_straddle_like_autogptq():
    """3-bit: 32 input rows -> 3 words; row 10 is split 2+1 bits over words 0/1, row 21 1+2 bits over words 1/2."""
    res = _result(3, 128)
    t = gptq_pack(res.q, res.scales, res.zeros, res.g_idx, 3)
    qw = t["qweight"]
    for o in (0, 17, 63):
        words = [int(w) & 0xFFFFFFFF for w in qw[0:3, o]]
        rows = [int(v) for v in res.q[o, 0:32]]
        assert rows[10] == ((words[0] >> 30) & 0x3) | ((words[1] & 0x1) << 2)
        assert rows[21] == ((words[1] >> 31) & 0x1) | ((words[2] & 0x3) << 1)
        assert rows[11] == (words[1] >> 1) & 0x7 and rows[22] == (words[2] >> 2) & 0x7
        assert _stream_unpack(words, 3, 32) == rows


@pytest.mark.parametrize(
    ("bits", "v1", "v2"), [(2, 0x55555555, 0xAAAAAAAA), (4, 0x77777777, 0x88888888), (8, 0x7F7F7F7F, 0x80808080)]
)
def test_symmetric_zeros_v1_is_midpoint_minus_one(bits, v1, v2):
    res = rtn_quantize(torch.randn(64, 128), bits, group_size=32)
    for fmt, word in (("gptq", v1), ("gptq_v2", v2)):
        t = gptq_pack(res.q, res.scales, res.zeros, res.g_idx, bits, checkpoint_format=fmt)
        assert bool(((t["qzeros"].to(torch.int64) & 0xFFFFFFFF) == word).all())


def test_asymmetric_zero_points_never_wrap_in_v1():
    W = torch.rand(32, 64) + 0.1  # all positive: a plain asymmetric grid would put the zero point at 0
    res = rtn_quantize(W, 4, group_size=32, sym=False)
    assert bool((res.zeros == 1).all())  # the solver keeps zero >= 1, so (zero - 1) is never negative
    assert float((res.weight - W).abs().max()) <= float(res.scales.max()) / 2 + 1e-6
    t = gptq_pack(res.q, res.scales, res.zeros, res.g_idx, 4)
    assert bool((t["qzeros"] == 0).all())
    # the packer itself still follows the spec for a zero of 0: field (0 - 1) mod 16 = 15
    t = gptq_pack(res.q, res.scales, torch.zeros_like(res.zeros), res.g_idx, 4)
    assert bool(((t["qzeros"].to(torch.int64) & 0xFFFFFFFF) == 0xFFFFFFFF).all())
    assert bool((gptq_unpack(t, 4)[2] == 0).all())


def test_gptq_export_errors():
    res = rtn_quantize(torch.randn(64, 128), 4, group_size=32)
    with pytest.raises(QuantkitError, match="2/3/4/8-bit"):
        gptq_pack(res.q, res.scales, res.zeros, res.g_idx, 5)
    with pytest.raises(QuantkitError, match="format"):
        gptq_pack(res.q, res.scales, res.zeros, res.g_idx, 4, checkpoint_format="marlin")
    odd = rtn_quantize(torch.randn(48, 128), 4, group_size=32)
    with pytest.raises(QuantkitError, match="divisible by 32"):
        gptq_pack(odd.q, odd.scales, odd.zeros, odd.g_idx, 4)
