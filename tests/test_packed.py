"""quantkit packed format: plane layout bit by bit, exact pack/unpack, dequantization, safetensors naming, stored bits,
GPTQ import, Hadamard rotation, the torch reference matmul and QuantLinear. No Triton here (see test_kernels.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.formats import (
    dequantize,
    from_gptq,
    from_tensors,
    hadamard,
    pack_gptq_result,
    pack_linear,
    padded_layout,
    plane_widths,
    stored_bits,
    stored_bits_for,
    to_tensors,
    unpack_codes,
)
from quantkit.formats.gptq import dequantize_gptq as gptq_dequantize
from quantkit.formats.gptq import gptq_pack
from quantkit.kernels import quant_matmul, resolve_backend
from quantkit.kernels.qlinear import QuantLinear
from quantkit.kernels.reference import reference_matmul
from quantkit.quant.gptq import gptq_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def random_packed(n, k, bits, group_size, act_order=False, sym=True, seed=0, bias=False, rot_in=0, rot_out=0):
    """A random PackedLinear plus the plain tensors it was built from (kernel-order codes qk, per-group zeros zf).

    Codes are drawn per kernel-order column within its segment's range; rot_in/rot_out > 0 add rotation signs with
    that block size. Scales are small so outputs stay O(1) for unit-variance inputs.
    """
    g = torch.Generator().manual_seed(seed)
    gs, layout = padded_layout(k, bits, group_size)
    k_pad = sum(c for _, c in layout)
    seg_bits = torch.cat([torch.full((c,), b) for b, c in layout])  # [K_pad] bits of each kernel column
    qk = (torch.rand(n, k, generator=g) * 2.0 ** seg_bits[:k]).long()  # [N, K] kernel order
    perm = torch.randperm(k, generator=g) if act_order else None
    q = qk if perm is None else torch.empty_like(qk).index_copy_(1, perm, qk)  # q[:, perm[j]] = qk[:, j]
    n_groups = k_pad // gs
    group_bits = seg_bits[::gs][:n_groups]  # [n_groups]
    scales = (torch.rand(n_groups, n, generator=g) * 0.04 / 2.0 ** group_bits[:, None] * 16 + 0.002).half()
    if sym:
        zeros, zf = None, (2.0 ** (group_bits - 1))[:, None].expand(-1, n)
    else:
        zeros = (torch.rand(n_groups, n, generator=g) * 2.0 ** group_bits[:, None]).long()
        zf = zeros.float()
    pl = pack_linear(
        q,
        scales,
        zeros,
        group_size,
        bits,
        perm=perm,
        bias=torch.randn(n, generator=g) if bias else None,
        had_in=hadamard.random_signs(k, seed + 1) if rot_in else None,
        had_in_block=rot_in,
        had_out=hadamard.random_signs(n, seed + 2) if rot_out else None,
        had_out_block=rot_out,
    )
    return pl, dict(q=q, qk=qk, perm=perm, scales=scales, zf=zf, gs=gs, layout=layout)


def naive_weight(info: dict) -> torch.Tensor:
    """W [N, K] original order from the plain tensors: W[:, perm[j]] = s[j // G] (qk[:, j] − z[j // G])."""
    k = info["qk"].shape[1]
    grp = torch.arange(k) // info["gs"]
    wk = info["scales"].float()[grp].T * (info["qk"].float() - info["zf"][grp].T)
    if info["perm"] is None:
        return wk
    w = torch.empty_like(wk)
    w[:, info["perm"]] = wk
    return w


def test_plane_widths():
    expected = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
    assert {b: plane_widths(b) for b in expected} == expected
    for bad in (1, 9, 0):
        with pytest.raises(QuantkitError):
            plane_widths(bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_planes_hold_codes_bit_by_bit(bits):
    """Read every code back from the raw int32 words with Python integers: plane w, word k // (32/w), bit offset."""
    pl, info = random_packed(3, 64, bits, 32, seed=bits)
    seg = pl.segments[0]
    words = [p.tolist() for p in seg.planes]
    for n in range(3):
        for k in range(64):
            code, low = 0, 0
            for w, plane in zip(plane_widths(bits), words, strict=True):
                per = 32 // w
                word = plane[k // per][n] & 0xFFFFFFFF
                code |= ((word >> (k % per * w)) & (2**w - 1)) << low
                low += w
            assert code == int(info["qk"][n, k]), (n, k)
    assert [tuple(p.shape) for p in seg.planes] == [(64 * w // 32, 3) for w in plane_widths(bits)]
    assert all(p.dtype == torch.int32 for p in seg.planes)


@pytest.mark.parametrize(
    "k,bits,gs,act",
    [
        (256, 3, 128, True),
        (200, 5, 64, False),  # padded to 256
        (200, [(4, 64), (3, 136)], 64, True),
        (384, [(8, 128), (6, 64), (2, 192)], 32, True),
        (96, 7, None, False),  # per-channel
    ],
)
def test_unpack_codes_exact(k, bits, gs, act):
    pl, info = random_packed(24, k, bits, gs, act_order=act, seed=k)
    codes = unpack_codes(pl)
    assert codes.shape == (24, pl.padded_in_features) and codes.dtype == torch.int32
    assert torch.equal(codes[:, :k].long(), info["qk"])
    assert not codes[:, k:].any()  # padding columns hold code 0
    assert pl.layout == info["layout"] and sum(c for _, c in pl.layout) % 32 == 0


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,gs", [(4, 32), ([(6, 64), (3, 136)], 64), (2, 128)])
def test_dequantize_matches_formula(bits, gs, sym):
    pl, info = random_packed(16, 200, bits, gs, act_order=True, sym=sym, seed=3)
    w = dequantize(pl)
    assert w.shape == (16, 200) and w.dtype == torch.float32
    torch.testing.assert_close(w, naive_weight(info), rtol=0, atol=0)


def test_padded_layout():
    assert padded_layout(200, 4, 128) == (128, [(4, 256)])
    assert padded_layout(200, 4, 32) == (32, [(4, 224)])
    assert padded_layout(100, 3, None) == (128, [(3, 128)])
    assert padded_layout(200, [(4, 64), (3, 136)], 64) == (64, [(4, 64), (3, 192)])
    with pytest.raises(QuantkitError, match="multiple of 64"):
        padded_layout(256, [(4, 32), (3, 224)], 64)  # boundary inside a group
    with pytest.raises(QuantkitError, match="cover"):
        padded_layout(256, [(4, 64), (3, 64)], 64)  # does not reach in_features
    with pytest.raises(QuantkitError, match="group size"):
        padded_layout(256, [(4, 128), (3, 128)], None)


def test_pack_linear_rejects_bad_input():
    q = torch.randint(0, 8, (8, 64))
    sc = torch.ones(2, 8)
    with pytest.raises(QuantkitError, match="out of range"):
        pack_linear(q * 2, sc, None, 32, 3)  # codes up to 14 at 3 bits
    with pytest.raises(QuantkitError, match="permutation"):
        pack_linear(q, sc, None, 32, 3, perm=torch.zeros(64, dtype=torch.long))
    with pytest.raises(QuantkitError, match="scales"):
        pack_linear(q, torch.ones(3, 8), None, 32, 3)
    with pytest.raises(QuantkitError, match="uint8"):
        pack_linear(q, sc, torch.full((2, 8), 300), 32, 3)
    with pytest.raises(QuantkitError, match="signs"):
        pack_linear(q, sc, None, 32, 3, had_in=torch.zeros(64), had_in_block=64)
    with pytest.raises(QuantkitError, match="block"):
        pack_linear(q, sc, None, 32, 3, had_in=torch.ones(64), had_in_block=48)


def test_tensor_names_and_safetensors_roundtrip(tmp_path):
    pl, _ = random_packed(40, 200, [(4, 64), (3, 136)], 64, act_order=True, sym=False, bias=True, rot_in=8, rot_out=8)
    t = to_tensors(pl, "model.layers.0.mlp.up_proj")
    spec = {name.removeprefix("model.layers.0.mlp.up_proj."): (v.dtype, tuple(v.shape)) for name, v in t.items()}
    assert spec == {
        "qmeta": (torch.int32, (6,)),
        "segments": (torch.int32, (2, 2)),
        "seg0_w4": (torch.int32, (8, 40)),
        "seg1_w2": (torch.int32, (12, 40)),
        "seg1_w1": (torch.int32, (6, 40)),
        "scales": (torch.float16, (4, 40)),
        "zeros": (torch.uint8, (4, 40)),
        "perm": (torch.int32, (200,)),
        "bias": (torch.float32, (40,)),
        "had_in": (torch.int8, (200,)),
        "had_out": (torch.int8, (40,)),
    }
    assert t["model.layers.0.mlp.up_proj.qmeta"].tolist() == [1, 200, 40, 64, 8, 8]
    assert t["model.layers.0.mlp.up_proj.segments"].tolist() == [[4, 64], [3, 192]]
    save_file(t, tmp_path / "x.safetensors")
    back = from_tensors("model.layers.0.mlp.up_proj", load_file(tmp_path / "x.safetensors"))
    assert torch.equal(dequantize(back), dequantize(pl))
    assert back.layout == pl.layout and back.had_in_block == 8 and torch.equal(back.bias, pl.bias)
    x = torch.randn(3, 200)
    torch.testing.assert_close(reference_matmul(x, back), reference_matmul(x, pl), rtol=0, atol=0)


def test_from_tensors_rejects_inconsistent_tensors():
    pl, _ = random_packed(8, 64, 3, 32, sym=False)
    good = to_tensors(pl, "m")
    cases = {
        "missing plane": {k: v for k, v in good.items() if k != "m.seg0_w1"},
        "wrong version": {**good, "m.qmeta": torch.tensor([9, 64, 8, 32, 0, 0], dtype=torch.int32)},
        "wrong dtype": {**good, "m.scales": good["m.scales"].float()},
        "wrong shape": {**good, "m.zeros": good["m.zeros"][:1]},
        "bad table": {**good, "m.segments": torch.tensor([[3, 32]], dtype=torch.int32)},
        "signs without block": {**good, "m.had_in": torch.ones(64, dtype=torch.int8)},
    }
    for what, tensors in cases.items():
        with pytest.raises(QuantkitError):
            from_tensors("m", tensors)
            pytest.fail(what)


def test_stored_bits_by_hand():
    """N=64, K=200, 4 bits on 64 columns then 3 bits, G=64, asym, act order, fp16 bias: K_pad = 256."""
    pl, _ = random_packed(64, 200, [(4, 64), (3, 136)], 64, act_order=True, sym=False)
    pl.bias = torch.zeros(64, dtype=torch.float16)
    codes = 64 * (4 * 64 + 3 * 192)  # 53248: the 3-bit segment is padded from 136 to 192 columns
    scales = 16 * 4 * 64  # 4096: 256/64 groups x 64 outputs, fp16
    zeros = 8 * 4 * 64  # 2048: uint8
    perm = 32 * 200  # 6400: int32 per input column
    tables = 32 * 6 + 32 * 2 * 2  # 320: qmeta header + 2 segment rows
    bias = 16 * 64  # 1024
    assert codes + scales + zeros + perm + tables + bias == 67136
    assert stored_bits(pl) == 67136
    assert stored_bits_for(64, 200, [(4, 64), (3, 136)], 64, asym=True, act_order=True, bias_bits=16) == 67136


@pytest.mark.parametrize(
    "k,bits,gs,act,sym,rot",
    [(256, 3, 128, False, True, 0), (200, 6, 32, True, False, 8), (96, 8, None, False, False, 32)],
)
def test_stored_bits_for_matches_packed(k, bits, gs, act, sym, rot):
    pl, _ = random_packed(48, k, bits, gs, act_order=act, sym=sym, rot_in=rot, rot_out=rot // 2)
    formula = stored_bits_for(48, k, bits, gs, asym=not sym, act_order=act, had_in=rot > 0, had_out=rot > 0)
    assert stored_bits(pl) == formula == sum(v.numel() * v.element_size() * 8 for v in to_tensors(pl).values())


@pytest.mark.parametrize("bits,gs", [(2, None), (3, None), (3, 32), ([(4, 64), (3, 128)], 64)])
def test_stored_bits_for_matches_what_the_solver_result_packs_to(bits, gs):
    """The allocator's budget equals the bytes of packed GPTQ results, act order included (a per-channel result
    stores no permutation: the bench once found per-channel candidates budgeted at ~0.1 bpw more than stored)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 192, generator=g) * torch.linspace(0.1, 3, 192)
    W = torch.randn(40, 192, generator=g)
    r = gptq_quantize(W, x.T @ x, bits, gs, sym=False, act_order=True)
    formula = stored_bits_for(40, 192, bits, gs, asym=True, act_order=True)
    assert stored_bits(pack_gptq_result(r)) == formula


def _gptq_inputs(n, k, gs, bits, desc_act, sym, seed):
    g = torch.Generator().manual_seed(seed)
    gs_eff = gs or k
    n_groups = -(-k // gs_eff)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = (torch.rand(n_groups, n, generator=g) + 0.01).half().float()
    zeros = torch.full((n_groups, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (n_groups, n), generator=g)
    g_idx = torch.arange(k) // gs_eff
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return q, scales, zeros, g_idx.to(torch.int32)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [True, False])
@pytest.mark.parametrize("bits,k,gs", [(2, 256, 64), (3, 224, 64), (4, 256, None), (8, 224, 128)])
def test_from_gptq_roundtrip(bits, k, gs, desc_act, sym, fmt):
    """GPTQ tensors written by formats.gptq.gptq_pack -> from_gptq -> dequantize == the GPTQ rule, exactly."""
    q, scales, zeros, g_idx = _gptq_inputs(32, k, gs, bits, desc_act, sym, seed=bits + k)
    t = gptq_pack(q, scales, zeros, g_idx, bits, checkpoint_format=fmt)
    pl = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, sym, checkpoint_format=fmt)
    assert (pl.perm is not None) == (desc_act and gs is not None) and (pl.zeros is None) == sym  # one group: no perm
    torch.testing.assert_close(dequantize(pl), gptq_dequantize(q, scales, zeros, g_idx), rtol=0, atol=0)


def test_from_gptq_rejects():
    q, scales, zeros, g_idx = _gptq_inputs(32, 256, 64, 4, False, False, seed=1)
    t = gptq_pack(q, scales, zeros, g_idx, 4)
    with pytest.raises(QuantkitError, match="zero points"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, sym=True)
    bad = g_idx.clone()
    bad[:10] = 1  # group 0 loses 10 columns to group 1
    with pytest.raises(QuantkitError, match="unequal"):
        from_gptq(t["qweight"], t["qzeros"], t["scales"], bad, 4, sym=False)


@pytest.mark.parametrize(
    "act_order,static_groups,sym", [(True, False, False), (True, True, True), (False, False, True)]
)
def test_gptq_solver_result_roundtrip(act_order, static_groups, sym):
    """Real solver output, packed directly and through the GPTQ checkpoint tensors, reproduces its weight."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g)
    x = torch.randn(512, 256, generator=g) * torch.rand(256, generator=g)
    r = gptq_quantize(w, x.T @ x / 512, 3, 64, sym=sym, act_order=act_order, static_groups=static_groups)
    torch.testing.assert_close(dequantize(pack_gptq_result(r)), r.weight, rtol=0, atol=0)
    t = gptq_pack(r.q, r.scales, r.zeros, r.g_idx, 3)
    pl = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 3, sym)
    torch.testing.assert_close(dequantize(pl), r.weight, rtol=0, atol=0)


def _rotation_matrix(signs: torch.Tensor, block: int) -> torch.Tensor:
    h = hadamard.hadamard_matrix(block) / block**0.5
    return torch.diag(signs.float()) @ torch.block_diag(*[h] * (signs.numel() // block))


def test_hadamard_matrix():
    h = hadamard.hadamard_matrix(16)
    torch.testing.assert_close(h @ h.T, 16 * torch.eye(16))
    assert torch.equal(h[1], torch.tensor([1.0, -1.0] * 8)) and torch.equal(h, h.T)
    assert hadamard.block_size(12288) == 4096 and hadamard.block_size(28672) == 4096 and hadamard.block_size(200) == 8


@pytest.mark.parametrize("n,block", [(64, 64), (96, 32), (200, 8), (256, 256), (512, 128)])
def test_rotate_matches_explicit_matrix(n, block):
    s = hadamard.random_signs(n, seed=n)
    r = _rotation_matrix(s, block)
    torch.testing.assert_close(r @ r.T, torch.eye(n), atol=1e-5, rtol=0)
    x = torch.randn(5, n, dtype=torch.float64).float()
    for fn in (hadamard.rotate, hadamard.rotate_fast):
        torch.testing.assert_close(fn(x, s, block), x @ r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fn(x, s, block, transpose=True), x @ r.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(QuantkitError):
        hadamard.rotate(x, s, 3)


def test_rotation_preserves_product():
    """y = x Wᵀ = (x R)(W R)ᵀ: what --rotate relies on."""
    s = hadamard.random_signs(128, seed=0)
    x, w = torch.randn(4, 128), torch.randn(16, 128)
    torch.testing.assert_close(hadamard.rotate(x, s, 64) @ hadamard.rotate(w, s, 64).T, x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matmul_matches_dequantized_weight(dtype):
    pl, info = random_packed(
        40, 192, [(5, 64), (3, 128)], 64, act_order=True, sym=False, bias=True, rot_in=64, rot_out=8
    )
    x = torch.randn(2, 3, 192).to(dtype)
    y = reference_matmul(x, pl)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    expected = x.float() @ dequantize(pl).T + pl.bias
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    stored = naive_weight(info)  # the rotated matrix as stored
    r_in, r_out = _rotation_matrix(pl.had_in, 64), _rotation_matrix(pl.had_out, 8)
    torch.testing.assert_close(dequantize(pl), r_out @ stored @ r_in.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dequantize(pl, unrotate=False), stored, atol=0, rtol=0)


def test_quant_linear_state_dict_forward_and_moves():
    pl, _ = random_packed(24, 96, [(4, 32), (2, 64)], 32, act_order=True, sym=False, bias=True)
    model = torch.nn.Sequential(QuantLinear(pl, backend="torch"))
    expected = to_tensors(pl, "0")
    sd = model.state_dict()
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], v) for k, v in expected.items())
    x = torch.randn(3, 96)
    torch.testing.assert_close(model(x), reference_matmul(x, pl), rtol=0, atol=0)
    model.half()  # a dtype cast must not touch codes, fp16 scales or zero points
    assert model[0].scales.dtype == torch.float16 and model[0].zeros.dtype == torch.uint8
    torch.testing.assert_close(model(x.half()), reference_matmul(x.half(), pl), rtol=0, atol=0)
    fresh = QuantLinear(random_packed(24, 96, [(4, 32), (2, 64)], 32, act_order=True, sym=False, seed=9, bias=True)[0])
    fresh.load_state_dict(model[0].state_dict())
    torch.testing.assert_close(fresh(x), reference_matmul(x, pl), rtol=0, atol=0)
    assert "segments=4b×32+2b×64" in repr(fresh)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(QuantkitError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(QuantkitError, match="unknown backend"):
        resolve_backend("cuda", torch.device("cpu"))
    pl, _ = random_packed(8, 64, 4, 32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(quant_matmul(x, pl), x @ dequantize(pl).T, rtol=1e-5, atol=1e-5)
