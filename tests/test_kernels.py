"""Triton dequant-matmul kernels against the torch reference: every bit width (2-8), mixed segments, group sizes
32/64/128 and per-channel, act order, sym/asym, padded in/out features, batch 1 and 17, fp16/fp32, each launch shape.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must be set before Triton is
imported (Triton's own library functions are wrapped at import), so it is set here at collection time. If Triton
was already imported in compiled mode, the module re-runs itself in a subprocess instead. With a GPU the same tests
run compiled on CUDA, plus a bf16 case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402  (after TRITON_INTERPRET)
from test_packed import random_packed  # noqa: E402

from quantkit.formats import dequantize, from_gptq, hadamard  # noqa: E402
from quantkit.formats.gptq import gptq_pack  # noqa: E402
from quantkit.formats.packed import dequantize_kernel_order  # noqa: E402
from quantkit.kernels import quant_matmul  # noqa: E402
from quantkit.kernels.autotune import tune  # noqa: E402
from quantkit.kernels.config import device_slug, load_config, pick  # noqa: E402
from quantkit.kernels.qlinear import QuantLinear  # noqa: E402
from quantkit.kernels.reference import reference_matmul  # noqa: E402
from quantkit.kernels.triton_dequant import triton_matmul  # noqa: E402

RUNNABLE = ON_GPU or type(tl.zeros).__name__ == "InterpretedFunction"
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="Triton imported before TRITON_INTERPRET: see test_rerun")
DEV = "cuda" if ON_GPU else "cpu"

# Launch shapes under test: the GEMV variant of the skinny path, its tl.dot variant, and the tiled path, with both
# plane unpack modes. Small blocks so that tails in N and K, several K splits and both scale modes (one row per
# tile, per-row gather when G < BLOCK_K) all occur on tiny matrices.
GEMV = dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=32, split_k=2, unpack="index")
SKINNY = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, split_k=2, unpack="reshape")
TILED = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, split_k=1, unpack="index")
GEMV_WORDS = dict(GEMV, unpack="reshape", BLOCK_K=64)  # single plane (2/4/8 bits): codes unpacked in registers
LAUNCHES = {"gemv": GEMV, "skinny": SKINNY, "tiled": TILED}


def _tol(dtype: torch.dtype) -> float:
    """Max error relative to max |reference|: fp16 rounds the dequantized weight and the output (2^-11 each)."""
    return {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


def check(pl, launch: dict, m: int, dtype: torch.dtype, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, pl.in_features, generator=g).to(dtype).to(DEV)
    plc = pl.to(DEV)
    y = triton_matmul(x, plc, launch=launch)
    ref = reference_matmul(x, plc)
    assert y.shape == ref.shape and y.dtype == dtype
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err <= _tol(dtype), f"relative error {err:.2e}"


# (bits, group size, act order, sym, dtype, N, K): every width meets every group size and sees both values of act
# order, sym and dtype; K = 200 is not a multiple of 32 or of the group size, N = 72 / 90 / 40 not of BLOCK_N.
CASES = [
    (bits, gs, (i + j) % 2 == 0, (i + 2 * j) % 3 != 0, (torch.float16, torch.float32)[(i + 2 * j + j // 2) % 2], n, k)
    for i, bits in enumerate([2, 3, 4, 5, 6, 7, 8])
    for j, (gs, n, k) in enumerate([(32, 72, 200), (64, 90, 256), (128, 40, 200)])
]


@needs_kernels
@pytest.mark.parametrize("bits,gs,act,sym,dtype,n,k", CASES)
def test_uniform_bits(bits, gs, act, sym, dtype, n, k):
    pl, _ = random_packed(n, k, bits, gs, act_order=act, sym=sym, seed=bits * 10 + gs, bias=gs == 64)
    check(pl, GEMV, 1, dtype)
    check(pl, GEMV_WORDS, 1, dtype)
    for launch in (SKINNY, TILED):
        for m in (1, 17):
            check(pl, launch, m, dtype)


MIXED = [
    ([(4, 64), (3, 136)], 64, True, False, 72, 200),
    ([(8, 32), (5, 64), (2, 160)], 32, True, True, 40, 256),
    ([(6, 128), (4, 128)], 128, False, False, 90, 256),
]


@needs_kernels
@pytest.mark.parametrize("layout,gs,act,sym,n,k", MIXED)
@pytest.mark.parametrize("launch", LAUNCHES)
def test_mixed_segments(layout, gs, act, sym, n, k, launch):
    pl, _ = random_packed(n, k, layout, gs, act_order=act, sym=sym, seed=n, bias=True)
    for m in (1, 17) if launch != "gemv" else (1,):
        for dtype in (torch.float16, torch.float32):
            check(pl, LAUNCHES[launch], m, dtype)


# (bits or segments, group size, sym, N, K): every width 2-8, zero points or not, per-row scale gathers (G < BLOCK_K),
# one scale row per tile, per channel, mixed segments; K = 200 pads the last segment, N = 40 / 72 has a tail
EXACT = [(bits, (32, 64, 128, None)[i % 4], i % 2 == 0, (40, 72)[i % 2], 256) for i, bits in enumerate(range(2, 9))] + [
    ([(8, 32), (5, 64), (2, 160)], 32, False, 40, 256),
    ([(6, 128), (4, 128)], 128, True, 72, 256),
    ([(4, 64), (3, 136)], 64, False, 72, 200),
]

# the tl.dot paths (BLOCK_M > 1) with split-K and not, both unpack modes, scales per tile and gathered per row
EXACT_LAUNCHES = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, split_k=2, unpack="reshape"),
                  dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, split_k=1, unpack="index")]


@needs_kernels
@pytest.mark.parametrize("bits,gs,sym,n,k", EXACT)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_dequantized_weights_are_the_fp32_product_rounded_once(bits, gs, sym, n, k, dtype):
    """The tl.dot paths dequantize without int->float conversions, in fp16 for fp16 activations; the result must be
    bit for bit s · (q − z) computed in fp32 and cast to the activation dtype. With x = I every output is one
    weight (the other terms of its sum are exact zeros), so the output is the dequantized matrix itself. Scales
    span 2^-16 .. 2^8 so that products round, and some are fp16 subnormals."""
    pl, _ = random_packed(n, k, bits, gs, sym=sym, seed=k + n + len(str(bits)))
    g = torch.Generator().manual_seed(n)
    pl.scales.copy_(torch.exp2(torch.rand(pl.scales.shape, generator=g) * 24 - 16) * (1 + torch.rand(1, generator=g)))
    want = dequantize_kernel_order(pl)[:, :k].T.to(dtype)  # [K, N]
    x = torch.eye(k, dtype=dtype).to(DEV)
    for launch in EXACT_LAUNCHES:
        y = triton_matmul(x, pl.to(DEV), launch=launch).cpu()
        diff = y != want
        assert not diff.any(), f"{launch}: {int(diff.sum())} of {y.numel()} differ: {y[diff][:4]} vs {want[diff][:4]}"


@needs_kernels
def test_gemv_many_rows():
    """The GEMV variant is chosen for M = 1 but must stay right for any M (one program row per input row)."""
    pl, _ = random_packed(40, 96, [(4, 32), (3, 64)], 32, act_order=True, sym=False, bias=True)
    check(pl, GEMV, 17, torch.float16)


@needs_kernels
@pytest.mark.parametrize("launch", LAUNCHES)
def test_per_channel_and_rotation(launch):
    """One group per row (G = K_pad, not a multiple of BLOCK_K) and rotated inputs and outputs."""
    pl, _ = random_packed(48, 96, 4, None, act_order=True, sym=False, bias=True, rot_in=32, rot_out=16)
    for m in (1, 17) if launch != "gemv" else (1,):
        check(pl, LAUNCHES[launch], m, torch.float32)
        check(pl, LAUNCHES[launch], m, torch.float16)


@needs_kernels
def test_gptq_checkpoint_through_kernels():
    """A desc_act GPTQ checkpoint, repacked: the kernels equal x · W_gptqᵀ computed from the GPTQ tensors."""
    g = torch.Generator().manual_seed(3)
    n, k, gs, bits = 64, 256, 64, 3
    q = torch.randint(0, 8, (n, k), generator=g)
    scales = (torch.rand(k // gs, n, generator=g) * 0.05).half().float()
    zeros = torch.randint(0, 8, (k // gs, n), generator=g)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)].to(torch.int32)
    t = gptq_pack(q, scales, zeros, g_idx, bits)
    pl = from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, sym=False)
    x = torch.randn(17, k, generator=g)
    w = scales[g_idx.long()].T * (q - zeros[g_idx.long()].T).float()  # the GPTQ rule, written out
    for launch in (SKINNY, TILED):
        y = triton_matmul(x.to(DEV), pl.to(DEV), launch=launch).cpu()
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_default_config_paths_and_qlinear():
    """quant_matmul / QuantLinear with backend="triton" and the shipped default.json: GEMV at M=1, skinny tl.dot at
    M=5, tiled at M=34 (leading dims flattened)."""
    pl, _ = random_packed(72, 200, [(5, 64), (3, 136)], 64, act_order=True, sym=True, bias=True)
    mod = QuantLinear(pl, backend="triton").to(DEV)
    for shape in ((1, 200), (5, 200), (2, 17, 200)):
        x = torch.randn(*shape).to(DEV)
        ref = reference_matmul(x, mod.packed)
        for y in (quant_matmul(x, mod.packed, backend="triton"), mod(x)):
            assert y.shape == (*shape[:-1], 72)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    ref = x @ dequantize(pl).T.to(DEV) + pl.bias.to(DEV)
    torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4)
    assert mod(x[:0]).shape == (0, 17, 72)  # an empty batch launches nothing


def test_config_selection():
    cfg = load_config()
    assert pick(cfg, 1) == ("skinny", cfg["skinny"][0]) and cfg["skinny"][0]["BLOCK_M"] == 1
    assert pick(cfg, 16)[0] == "skinny" and pick(cfg, 17)[0] == "tiled" and pick(cfg, 4096)[0] == "tiled"
    assert pick(cfg, 1, path="tiled")[0] == "tiled"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert load_config("no such GPU") == cfg


@pytest.mark.skipif(not ON_GPU, reason="bf16 math needs a GPU (the interpreter has none)")
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bf16_on_gpu(bits):
    pl, _ = random_packed(1024, 4096, bits, 128, act_order=True, sym=False, bias=True, rot_in=4096)
    for launch in LAUNCHES.values():
        check(pl, launch, 1, torch.bfloat16)
        check(pl, launch, 16, torch.bfloat16)


@pytest.mark.skipif(RUNNABLE, reason="kernels run in this process")
def test_rerun():
    """Triton was imported in compiled mode before this module: run it again in a fresh interpreter process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_rotation_fast_path_matches_reference():
    s = hadamard.random_signs(384, seed=1)
    x = torch.randn(3, 384)
    torch.testing.assert_close(hadamard.rotate_fast(x, s, 128), hadamard.rotate(x, s, 128), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_autotune_plumbing(tmp_path):
    """tune() skips a candidate that cannot launch, keeps the fastest, and writes entries pick() can use."""
    bad = dict(BLOCK_M=1, BLOCK_N=48, BLOCK_K=32, split_k=1)  # BLOCK_N not a power of two: Triton refuses it
    good = [dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32, split_k=2), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, split_k=1)]
    times = iter([5.0, 2.0, 3.0, 1.0])  # skinny: good[0] 5, good[1] 2; tiled: good[0] 3, good[1] 1

    def timer(fn):
        fn()
        return next(times)

    logs = []
    cfg = tune([(128, 40)], [3], {"skinny": [1], "tiled": [17]}, timer, DEV, lambda p, m: [bad, *good], logs.append)
    assert any("skip" in line for line in logs)
    assert cfg["skinny"] == [{"max_m": 1, **good[1]}] and cfg["tiled"] == [{"max_m": None, **good[1]}]
    (tmp_path / "gpu.json").write_text(json.dumps(cfg))
    assert pick(json.loads((tmp_path / "gpu.json").read_text()), 1)[1]["BLOCK_N"] == 64


FIXUP_GEMV = dict(GEMV, reduce="fixup", split_k=3)
FIXUP_SKINNY = dict(SKINNY, reduce="fixup")


@needs_kernels
@pytest.mark.parametrize("layout", [3, 8, [(6, 128), (2, 128)], [(4, 64), (7, 64), (3, 128)]])
@pytest.mark.parametrize("launch", [FIXUP_GEMV, FIXUP_SKINNY], ids=["gemv", "skinny"])
def test_fixup_reduction_writes_the_output_and_leaves_the_workspace_zero(layout, launch):
    """Split-K / segment partial sums through the self-clearing workspace: the tile's last program adds the bias and
    casts, no zero-fill; calls in a row (as replays of a CUDA graph) give the same result."""
    from quantkit.kernels import triton_dequant as td

    pl, _ = random_packed(72, 256, layout, 64, act_order=True, bias=True, seed=len(str(layout)))
    for m, dtype in ((1, torch.float16), (5, torch.float32)):
        check(pl, launch, m, dtype)
        x = torch.randn(m, 256).to(dtype).to(DEV)
        first = triton_matmul(x, pl.to(DEV), launch=launch)
        assert torch.equal(triton_matmul(x, pl.to(DEV), launch=launch), first) or dtype == torch.float32
        ws, cnt = td._WORKSPACE[torch.device(DEV) if ON_GPU else x.device]
        assert not ws.any() and not cnt.any()
