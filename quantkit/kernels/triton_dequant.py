"""Triton dequant-matmul kernels for the quantkit packed format (quantkit.formats.packed).

One kernel, launched once per bit segment, computes out[M, N] (+)= x_seg[M, K_seg] · W_segᵀ from the packed planes:
each program loops over its K range in BLOCK_K rows, loads every plane's words for the tile (32/w codes per word along
K, so a word row serves 32/w consecutive k), unpacks them with shifts and masks, applies the group scale and zero
and multiplies by the activation tile. Two launch shapes ("paths") of the same kernel:

* skinny (decode, M ≤ ~16): split-K over a third grid axis so a few output columns still fill the GPU; partial sums
  are added atomically into an fp32 buffer. BLOCK_M == 1 is a GEMV (broadcast multiply + tl.sum, no tensor cores);
  BLOCK_M == 16 uses tl.dot with the rows padded, as gemlite's GEMM_SPLITK does.
* tiled (prefill): one program per [BLOCK_M, BLOCK_N] output tile with tl.dot over the whole K range.

A single-segment matrix without split-K writes the output (bias included) directly; otherwise segments and K
splits accumulate atomically into fp32 (fp32 atomics, which also work under TRITON_INTERPRET=1). Act order is not
handled here: callers pass x already gathered to kernel column order (x[..., perm]), so weights and scales are read
in storage order with no per-element g_idx gather.

Planes are unpacked either by loading each word once and expanding it in registers (config "unpack": "reshape") or
by loading the word of every row ("index"); which is faster is a per-GPU question, so it is a config key.
Tests run these kernels in Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.errors import QuantkitError
from quantkit.formats import hadamard
from quantkit.formats.packed import PackedLinear, Segment, plane_widths
from quantkit.kernels.config import load_config, pick
from quantkit.kernels.reference import kernel_input

MAX_PLANES = 3


@triton.jit
def _plane(
    ptr,
    k0,
    k_hi,
    offs_n,
    n_mask,
    N,
    W: tl.constexpr,
    LOW: tl.constexpr,
    RESHAPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bits [LOW, LOW + W) of the codes of rows k0 .. k0 + BLOCK_K from a W-bit plane: int32 [BLOCK_K, BLOCK_N].

    RESHAPE loads each word once ([BLOCK_K·W/32, BLOCK_N]) and expands it in registers; otherwise every row loads
    its word (32/W rows share one; the cache serves the repeats), the GPTQ-triton / gemlite way.
    """
    PER: tl.constexpr = 32 // W
    if RESHAPE:
        rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
        mask = (rows < k_hi // PER)[:, None] & n_mask[None, :]
        words = tl.load(ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first")
        shifts = tl.arange(0, PER) * W
        q = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << W) - 1), [BLOCK_K, BLOCK_N])
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < k_hi)[:, None] & n_mask[None, :]
        words = tl.load(
            ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0, eviction_policy="evict_first"
        )
        q = (words >> ((offs_k % PER) * W)[:, None]) & ((1 << W) - 1)
    return q << LOW


@triton.jit
def _f16(v):
    """1024 + v as fp16 for integers 0 ≤ v < 1024, with no conversion instruction: 0x6400 is 1024.0 in fp16 and
    its 10 mantissa bits count units, so OR-ing v into them adds it exactly (Marlin's / FasterTransformer's trick)."""
    return (v | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _f32(v):
    """2^23 + v as fp32 for integers 0 ≤ v < 2^23, with no conversion instruction (0x4B000000 is 2^23, ulp 1)."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(q, z, s, dtype: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """(q − z) · s for a tl.dot in dtype: fp16 math for fp16, fp32 math rounded to bf16 for bf16, with no int->float
    conversions; fp32 (exact FMA dot, small tiles: 8 conversions a step) keeps them. q and z are codes < 2^8.

    All are bit for bit the fp32 product cast to dtype: q − z is exact in fp16 and fp32 (2^10 + q and 2^10 + z are, so
    is their difference), and the fp32 product of an 8-bit integer and an fp16 scale is exact, so rounding it to
    fp16 once is what the fp16 multiply does. bf16 keeps the fp32 product: a bf16 product would round the fp16
    scale to bf16 first, which is not the same.
    """
    if dtype == tl.float16:
        if HAS_ZEROS:
            zh = _f16(z)
        else:
            zh = tl.cast(1024.0 + z, tl.float16)  # a Python float would promote the math to fp32
        return (_f16(q) - zh) * s.to(tl.float16)
    elif dtype == tl.bfloat16:
        if HAS_ZEROS:
            zf = _f32(z)
        else:
            zf = 8388608.0 + z
        return ((_f32(q) - zf) * s.to(tl.float32)).to(tl.bfloat16)
    else:
        return (q - z).to(tl.float32) * s.to(tl.float32)


@triton.jit
def _gemv_words(x_ptr, p_ptr, s_ptr, z_ptr, k0, k_hi, K_valid, offs_n, n_mask, N, W: tl.constexpr,
                SYM_ZERO: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K step of a single-plane GEMV, [1, BLOCK_N]: codes stay [words, codes per word, BLOCK_N] as unpacked
    from each word, x is loaded in that shape too, and the scale (one row per tile) multiplies the column sums
    once. Reshaping the codes to [BLOCK_K, BLOCK_N] instead costs a shared-memory round trip with barriers per
    step (compile_check's table: the `bar` column)."""
    PER: tl.constexpr = 32 // W
    R: tl.constexpr = BLOCK_K // PER
    rows = k0 // PER + tl.arange(0, R)
    words = tl.load(p_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows < k_hi // PER)[:, None] & n_mask[None, :],
                    other=0, eviction_policy="evict_first")  # [R, BLOCK_N]
    q = (words[:, None, :] >> (tl.arange(0, PER) * W)[None, :, None]) & ((1 << W) - 1)  # [R, PER, BLOCK_N]
    offs_k = k0 + tl.arange(0, R)[:, None] * PER + tl.arange(0, PER)[None, :]  # [R, PER]
    xv = tl.load(x_ptr + offs_k, mask=offs_k < K_valid, other=0.0).to(tl.float32)
    g = k0 // GROUP
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    if HAS_ZEROS:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)[None, None, :]
    else:
        z = SYM_ZERO
    col = tl.sum(tl.sum(xv[:, :, None] * (q - z).to(tl.float32), axis=1), axis=0)  # [BLOCK_N]
    return (col * s)[None, :]


@triton.jit
def _qmm(
    x_ptr,  # [M, K_seg] activations of this segment (row stride stride_xm, unit column stride)
    out_ptr,  # [M, N] output (x dtype when direct or FIXUP) or fp32 accumulator (ATOMIC)
    bias_ptr,  # [N] (read only when HAS_BIAS)
    ws_ptr,  # FIXUP: fp32 [M, N] workspace, zero between calls (the last program of a tile clears it)
    cnt_ptr,  # FIXUP: int32 [tiles] arrival counters, zero between calls
    p0_ptr,  # int32 planes [K_seg·W/32, N] of widths W0, W1, W2 (W = 0: unused)
    p1_ptr,
    p2_ptr,
    s_ptr,  # fp16 [K_seg/GROUP, N] scales of this segment's groups
    z_ptr,  # uint8 [K_seg/GROUP, N] zero points (read only when HAS_ZEROS)
    M,
    N,
    K_seg,  # columns of the segment (multiple of 32 and GROUP)
    K_valid,  # columns with real inputs (≤ K_seg; the rest is padding)
    k_split,  # K columns per split (multiple of BLOCK_K)
    stride_xm,
    stride_om,
    n_parts,  # FIXUP: programs adding into each output tile, over every segment's launch
    W0: tl.constexpr,
    W1: tl.constexpr,
    W2: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    GROUP: tl.constexpr,
    TILE_SCALES: tl.constexpr,  # GROUP % BLOCK_K == 0: one scale row per tile
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    FIXUP: tl.constexpr,  # ATOMIC into ws; the tile's last program adds the bias and writes out in its dtype
    PRECISION: tl.constexpr,
    RESHAPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K_seg)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if BLOCK_M == 1 and W1 == 0 and RESHAPE and TILE_SCALES:
            acc += _gemv_words(x_ptr + pid_m * stride_xm, p0_ptr, s_ptr, z_ptr, k0, k_hi, K_valid, offs_n, n_mask, N,
                               W0, SYM_ZERO, HAS_ZEROS, GROUP, BLOCK_K)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = _plane(p0_ptr, k0, k_hi, offs_n, n_mask, N, W0, 0, RESHAPE, BLOCK_K, BLOCK_N)  # [BLOCK_K, BLOCK_N]
            if W1 > 0:
                q |= _plane(p1_ptr, k0, k_hi, offs_n, n_mask, N, W1, W0, RESHAPE, BLOCK_K, BLOCK_N)
            if W2 > 0:
                q |= _plane(p2_ptr, k0, k_hi, offs_n, n_mask, N, W2, W0 + W1, RESHAPE, BLOCK_K, BLOCK_N)
            if TILE_SCALES:
                g = k0 // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0)[None, :]
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.int32)[None, :]
                else:
                    z = SYM_ZERO
            else:
                g_offs = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
                g_mask = (offs_k < k_hi)[:, None] & n_mask[None, :]
                s = tl.load(s_ptr + g_offs, mask=g_mask, other=0.0)
                if HAS_ZEROS:
                    z = tl.load(z_ptr + g_offs, mask=g_mask, other=0).to(tl.int32)
                else:
                    z = SYM_ZERO
            x_k_mask = offs_k < K_valid
            if BLOCK_M == 1:  # the int->float bitcasts here cost registers (compile_check): plain conversions
                w = (q - z).to(tl.float32) * s.to(tl.float32)  # [BLOCK_K, BLOCK_N]
                xv = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=x_k_mask, other=0.0)  # pid_m < M: grid is M rows
                acc += tl.sum(xv.to(tl.float32)[:, None] * w, axis=0)[None, :]
            else:
                x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & x_k_mask[None, :], other=0.0, eviction_policy="evict_last")
                acc = tl.dot(xt, _dequant(q, z, s, xt.dtype, HAS_ZEROS), acc, input_precision=PRECISION)
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if FIXUP:
        w_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(w_ptrs, acc, mask=o_mask, sem="release")
        tl.debug_barrier()  # every thread's adds are issued before the tile's arrival is counted
        tile = cnt_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == n_parts - 1:
            total = tl.atomic_add(w_ptrs, tl.zeros_like(acc), mask=o_mask, sem="acquire")  # read at L2
            tl.store(w_ptrs, tl.zeros_like(acc), mask=o_mask)  # every other program of the tile is done
            tl.store(tile, 0)
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(o_ptrs, total.to(out_ptr.dtype.element_ty), mask=o_mask)
    elif ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split_k(cfg: dict, tiles: int, n_cols: int, device: torch.device) -> int:
    """K splits so that tiles · splits programs reach the config's programs-per-SM target."""
    split = cfg.get("split_k", 1)
    if split == "auto":
        target = int(cfg.get("programs_per_sm", 4)) * _sm_count(device)
        split = -(-target // tiles)
    return max(1, min(int(split), -(-n_cols // cfg["BLOCK_K"])))


def fp32_launch(cfg: dict) -> dict:
    """The tl.dot launch for fp32 activations: their dot is exact fp32 FMA math ("ieee"), not tensor cores, and the
    fp16 configs' tiles spill hundreds of registers per thread with it (compile_check), so tiles stay small."""
    return dict(cfg, BLOCK_M=16, BLOCK_N=min(cfg["BLOCK_N"], 32), BLOCK_K=min(cfg["BLOCK_K"], 32), num_warps=4,
                num_stages=2)


_WORKSPACE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, size: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed fp32 workspace [size] and int32 tile counters [tiles] of the "fixup" reduction on device.

    Kept across calls (grown when too small): every call leaves them zero again, so there is no zero-fill per
    call and their addresses stay fixed for CUDA graphs. Calls on one device must not overlap (one stream).
    """
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < size or cnt.numel() < tiles:
        size = max(size, 0 if ws is None else ws.numel())
        tiles = max(tiles, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        cnt = torch.zeros(tiles, dtype=torch.int32, device=device)
        _WORKSPACE[device] = ws, cnt
    return ws, cnt


def _starts(pl: PackedLinear) -> list[int]:
    starts, s = [], 0
    for seg in pl.segments:
        starts.append(s)
        s += seg.n_cols
    return starts


def _k_split(n_cols: int, split: int, bk: int) -> int:
    """K columns per split: a multiple of BLOCK_K."""
    per = -(-n_cols // split)
    return -(-per // bk) * bk


def segment_matmul(
    x: torch.Tensor, pl: PackedLinear, cfg: dict, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, bool]:
    """x [M, K] in kernel column order (contiguous) -> (out [M, N], bias_added).

    out is in out_dtype with the bias added when one launch writes it directly (one segment, no split-K, bias
    requested by passing out_dtype), or when the config's "reduce" is "fixup": split-K and segment partial sums
    then go to a workspace that stays zero between calls and the last program of each tile writes the output,
    which saves the zero-fill and the cast launches of the default ("atomic": an fp32 accumulator without bias).
    """
    m, k_in = x.shape
    n, g = pl.out_features, pl.group_size
    if k_in != pl.in_features:
        raise QuantkitError(f"input has {k_in} features, the packed linear expects {pl.in_features}")
    if max(x.numel(), m * n, pl.padded_in_features * n) >= 2**31:
        raise QuantkitError("tensor too large for the kernel's int32 offsets; split the batch")
    if m == 0:
        return torch.zeros(0, n, dtype=out_dtype or torch.float32, device=x.device), out_dtype is not None
    if x.dtype == torch.float32 and cfg["BLOCK_M"] > 1:
        cfg = fp32_launch(cfg)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = -(-m // bm) * -(-n // bn)
    splits = [_split_k(cfg, tiles, s.n_cols, x.device) for s in pl.segments]
    direct = out_dtype is not None and len(pl.segments) == 1 and splits[0] == 1
    fixup = not direct and out_dtype is not None and cfg.get("reduce", "atomic") == "fixup"
    ws = cnt = None
    if direct or fixup:
        out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    if fixup:
        ws, cnt = _workspace(x.device, m * n, tiles)
    launched = [(seg, split) for seg, split, start in zip(pl.segments, splits, _starts(pl), strict=True)
                if direct or min(seg.n_cols, k_in - start) > 0]
    n_parts = sum(-(-seg.n_cols // _k_split(seg.n_cols, split, bk)) for seg, split in launched)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    start = 0
    for seg, split in zip(pl.segments, splits, strict=True):
        k_valid = max(0, min(seg.n_cols, k_in - start))
        if k_valid == 0 and not direct:
            start += seg.n_cols
            continue
        widths = list(plane_widths(seg.bits)) + [0] * (MAX_PLANES - len(seg.planes))
        planes = seg.planes + [seg.planes[0]] * (MAX_PLANES - len(seg.planes))
        k_split = _k_split(seg.n_cols, split, bk)
        scales = pl.scales[start // g :]
        zeros = pl.zeros[start // g :] if pl.zeros is not None else scales
        has_bias = (direct or fixup) and pl.bias is not None
        bias = pl.bias if has_bias else scales
        grid = (-(-m // bm), -(-n // bn), -(-seg.n_cols // k_split))
        _qmm[grid](
            x[:, start:],
            out,
            bias,
            out if ws is None else ws,
            out if cnt is None else cnt,
            *planes,
            scales,
            zeros,
            m,
            n,
            seg.n_cols,
            k_valid,
            k_split,
            x.stride(0),
            out.stride(0),
            n_parts,
            W0=widths[0],
            W1=widths[1],
            W2=widths[2],
            SYM_ZERO=2 ** (seg.bits - 1),
            HAS_ZEROS=pl.zeros is not None,
            GROUP=g,
            TILE_SCALES=g % bk == 0,
            HAS_BIAS=has_bias,
            ATOMIC=not direct,
            FIXUP=fixup,
            PRECISION=precision,
            RESHAPE=cfg.get("unpack", "reshape") == "reshape",
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=cfg.get("num_warps", 4),
            num_stages=cfg.get("num_stages", 2),
        )
        start += seg.n_cols
    return out, (direct or fixup) and pl.bias is not None


def triton_matmul(
    x: torch.Tensor, pl: PackedLinear, path: str | None = None, launch: dict | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · Wᵀ + bias through the Triton kernels, in x's dtype (fp16, bf16 or fp32).

    path forces "skinny" or "tiled" (default: by row count, from the GPU's JSON config); launch replaces the
    config entry (BLOCK_M/N/K, split_k, num_warps, num_stages).
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantkitError(f"quantized matmul takes fp16, bf16 or fp32 activations, not {x.dtype}")
    if pl.device != x.device:
        raise QuantkitError(f"activations on {x.device} but the packed weights on {pl.device}")
    k, n = pl.in_features, pl.out_features
    lead = x.shape[:-1]
    x2 = kernel_input(x.reshape(-1, k), pl, fast=True).contiguous()  # [M, K] kernel column order
    if launch is None:
        name = torch.cuda.get_device_name(x.device) if x.is_cuda else None
        _, launch = pick(load_config(name), x2.shape[0], path)
    out_dtype = x.dtype if pl.had_out is None else None
    out, bias_added = segment_matmul(x2, pl, launch, out_dtype)  # [M, N]
    if pl.had_out is not None:
        out = hadamard.rotate_fast(out, pl.had_out, pl.had_out_block, transpose=True)
    if pl.bias is not None and not bias_added:
        out = out + pl.bias.float()
    return out.to(x.dtype).reshape(*lead, n)


def _meta(pl: PackedLinear) -> list[int]:
    """The integers of a PackedLinear that the custom op needs to rebuild it from its tensors."""
    meta = [pl.in_features, pl.out_features, pl.group_size, pl.had_in_block, pl.had_out_block, len(pl.segments)]
    for s in pl.segments:
        meta += [s.bits, s.n_cols, len(s.planes)]
    return meta


def _rebuild(planes, scales, zeros, perm, bias, had_in, had_out, meta: list[int]) -> PackedLinear:
    k, n, g, hib, hob, n_seg = meta[:6]
    segments, i = [], 0
    for j in range(n_seg):
        bits, cols, n_planes = meta[6 + 3 * j : 9 + 3 * j]
        segments.append(Segment(bits, cols, list(planes[i : i + n_planes])))
        i += n_planes
    return PackedLinear(k, n, g, segments, scales, zeros, perm, bias, had_in, hib, had_out, hob)


@torch.library.custom_op("quantkit::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    planes: list[torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    had_in: torch.Tensor | None,
    had_out: torch.Tensor | None,
    meta: list[int],
) -> torch.Tensor:
    """triton_matmul as a torch custom op, so torch.compile traces through it (an opaque call with a known
    output shape) instead of breaking the graph at the Triton launch."""
    return triton_matmul(x, _rebuild(planes, scales, zeros, perm, bias, had_in, had_out, meta))


@quant_linear_op.register_fake
def _(x, planes, scales, zeros, perm, bias, had_in, had_out, meta):
    return x.new_empty(*x.shape[:-1], meta[1])


def quant_linear(x: torch.Tensor, pl: PackedLinear) -> torch.Tensor:
    """triton_matmul through the custom op: what quant_matmul runs, eagerly and under torch.compile alike (eager
    pays one dispatch per call; decoding on a GPU replays a CUDA graph, where that cost is paid once at capture)."""
    planes = [p for s in pl.segments for p in s.planes]
    return quant_linear_op(x, planes, pl.scales, pl.zeros, pl.perm, pl.bias, pl.had_in, pl.had_out, _meta(pl))
