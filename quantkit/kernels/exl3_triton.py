"""The EXL3 kernels (formats/exl3.py's layout, issue 27): tile decode, decode-GEMV, and the encoder's Viterbi pass.

- `_decode_tiles` (decode_inner): one program per 16x16 tile; for each of its 256 stream positions i it reads the
  16-bit window of the tile's cyclic bitstream that ends at bit (i + 1) K (two stream words at most; stream word j
  is stored word j ^ 1), computes the codebook value of that state in registers (3INST / MCG: a 32-bit multiply-add,
  mask and xor, then the two fp16 halves added in fp32; MUL1: a multiply, the sum of the four bytes, read as fp16,
  scaled and shifted in fp32) and stores it at its tile cell in fragment order, in fp32 (equal to the reference
  decoder bit for bit) or in the activations' dtype for the prefill's matmul.
- `_gemv` (gemv): y = x W for up to 16 rows with nothing dense in memory: both Hadamard transforms and scales
  fused, Ŵ decoded in registers.
- `_viterbi_forward`, `_viterbi_back` (viterbi): quant/trellis.py's encoder on a GPU, one tile per program: all
  256 steps of a pass in one launch (path costs per state suffix, 2^(16-K) floats, and each step's choice as a
  byte), and the way back in another.
Tests run them in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before Triton is imported);
kernels/compile_check.py compiles them for sm_80 / sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.formats import exl3

BOOK_IDS = {"3inst": 0, "mcg": 1, "mul1": 2}


@triton.jit
def _state(words, i, K: tl.constexpr):
    """The 16-bit trellis state at stream positions i of the tiles whose words start at `words` (broadcast with i):
    the window of the cyclic stream ending at bit (i + 1) K, from two words at most (stream word j is word j ^ 1)."""
    start = ((i + 1) * K - 16 + 256 * K) % (256 * K)  # first bit of the window, wrapping around
    w0 = start // 16
    w1 = (w0 + 1) % (16 * K)
    hi = tl.load(words + (w0 ^ 1)).to(tl.int32) & 0xFFFF
    lo = tl.load(words + (w1 ^ 1)).to(tl.int32) & 0xFFFF
    return (((hi << 16) | lo) >> (16 - start % 16)) & 0xFFFF


@triton.jit
def _value(state, BOOK: tl.constexpr):
    """fp32: the codebook value of each state (formats/exl3.py's codebooks, computed in registers)."""
    s = state.to(tl.uint32)
    if BOOK == 2:
        x = s * 0x83DCD12D
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF) + 0x6400
        value = total.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = tl.full(state.shape, 0x1EEE, tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        shift = tl.full(state.shape, 0xC931, tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = value * scale + shift
    else:
        if BOOK == 0:
            x = s * 89226354 + 64248484
        else:
            x = s * 0xCBAC1FED
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo_half = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi_half = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        value = lo_half + hi_half
    return value


@triton.jit
def _decode_tiles(trellis, out, tiles_n, n_out, K: tl.constexpr, BOOK: tl.constexpr):
    tk = tl.program_id(0)
    tn = tl.program_id(1)
    i = tl.arange(0, 256)
    value = _value(_state(trellis + (tk * tiles_n + tn) * (16 * K), i, K), BOOK)
    lane, j = i // 8, i % 8
    row = 2 * (lane % 4) + (j % 4 % 2) + 8 * (j % 4 // 2)
    col = lane // 4 + 8 * (j // 4)
    tl.store(out + (tk * 16 + row) * n_out + tn * 16 + col, value.to(out.dtype.element_ty))


@triton.jit
def _gemv(x, suh, svh, trellis, had, y, m, n_in, tiles_n, chunks_per_split,
          K: tl.constexpr, BOOK: tl.constexpr, BM: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """y[:m, block] (+)= H((H(x suh) Ŵ)[:, block]) svh[block] for one 128-wide block of outputs and one split of the
    inputs (chunks of 128 rows): the input Hadamard on each chunk of x, Ŵ decoded in registers one row of tiles (16
    rows) at a time, the output Hadamard on the partial sum; splits add into y (it is linear, so the partial sums
    may be transformed apiece). The 16-row steps are a loop, not unrolled, so that only one step's decoded values
    and Hadamard columns are live at a time."""
    pn = tl.program_id(0)
    first = tl.program_id(1) * chunks_per_split
    rows = tl.arange(0, BM)[:, None]
    c128 = tl.arange(0, 128)
    r16 = tl.arange(0, 16)
    # Each element (r, c) of a 16 x 128 row of tiles: its tile's words and its stream position in the tile (the
    # inverse of the fragment order of _decode_tiles).
    r, c = r16[:, None], c128[None, :]
    pos = ((c % 8) * 4 + (r % 8) // 2) * 8 + (c % 16 // 8) * 4 + (r // 8) * 2 + r % 2
    tile = (pn * 8 + c // 16) * (16 * K)
    acc = tl.zeros([BM, 128], dtype=tl.float32)
    for chunk in range(first, tl.minimum(first + chunks_per_split, n_in // 128)):
        xs = tl.load(x + rows * n_in + chunk * 128 + c128[None, :], mask=rows < m, other=0.0).to(tl.float32)
        xs = xs * tl.load(suh + chunk * 128 + c128).to(tl.float32)[None, :]
        for step in range(8):
            h = tl.load(had + c128[:, None] * 128 + step * 16 + r16[None, :])  # columns of H for these 16 rows
            xh = tl.dot(xs, h, input_precision="ieee")  # [BM, 16]: these inputs after the Hadamard
            words = trellis + (chunk * 8 + step) * tiles_n * (16 * K) + tile
            w = _value(_state(words, pos, K), BOOK)  # [16, 128] of Ŵ
            acc += tl.dot(xh.to(x.dtype.element_ty), w.to(x.dtype.element_ty), input_precision="ieee")
    for step in range(8):
        h = tl.load(had + c128[:, None] * 128 + step * 16 + r16[None, :])
        part = tl.dot(acc, h, input_precision="ieee")
        part = part * tl.load(svh + pn * 128 + step * 16 + r16).to(tl.float32)[None, :]
        ptr = y + rows * (tiles_n * 16) + pn * 128 + step * 16 + r16[None, :]
        if ATOMIC:
            tl.atomic_add(ptr, part, mask=rows < m)
        else:
            tl.store(ptr, part, mask=rows < m)


def decode_inner(trellis: torch.Tensor, book: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[in, out] in dtype: Ŵ decoded by the kernel (same contract as formats.exl3.decode_inner; fp16 / bf16 for the
    prefill's tensor-core matmul)."""
    k = exl3.bits_per_weight(trellis)
    tiles_k, tiles_n = trellis.shape[:2]
    out = torch.empty(tiles_k * 16, tiles_n * 16, dtype=dtype, device=trellis.device)
    _decode_tiles[(tiles_k, tiles_n)](trellis.contiguous(), out, tiles_n, tiles_n * 16, K=k, BOOK=BOOK_IDS[book])
    return out


GEMV_ROWS = 16  # at most this many input rows take the GEMV (tl.dot's smallest M); more take decode + matmul


def gemv(x: torch.Tensor, trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, book: str,
         splits: int | None = None) -> torch.Tensor:  # fmt: skip
    """x [m <= 16, in] @ W [in, out] in one kernel (W = diag(suh) H Ŵ H diag(svh), formats/exl3.py), fp32 [m, out]:
    what a decode step runs. The inputs are split `splits` ways (default: enough programs to fill a GPU's SMs when
    there are few output blocks), each split adding its share into y."""
    k = exl3.bits_per_weight(trellis)
    m, n_in = x.shape
    tiles_k, tiles_n = trellis.shape[:2]
    if m > GEMV_ROWS or n_in != tiles_k * 16 or n_in % 128 or tiles_n % 8:
        raise ValueError(f"gemv takes [<= {GEMV_ROWS}, in] inputs of a trellis [{tiles_k}, {tiles_n}, 16 K] with in "
                         f"and out multiples of 128, not x {list(x.shape)}")  # fmt: skip
    chunks, blocks = n_in // 128, tiles_n // 8
    if splits is None:
        splits = max(1, min(chunks, 132 // blocks))  # about one program per SM of an H100
    per = -(-chunks // splits)
    splits = -(-chunks // per)
    y = (torch.zeros if splits > 1 else torch.empty)(m, tiles_n * 16, dtype=torch.float32, device=x.device)
    had = exl3.hadamard(device=x.device)
    _gemv[(blocks, splits)](x.contiguous(), suh, svh, trellis.contiguous(), had, y, m, n_in, tiles_n, per, K=k,
                            BOOK=BOOK_IDS[book], BM=GEMV_ROWS, ATOMIC=splits > 1, num_warps=4, maxnreg=192)  # fmt: skip
    return y


VITERBI_BLOCK = 4096  # trellis states one step of the Viterbi kernel handles at a time (16 blocks per step)
VITERBI_WARPS = 8  # 16 states per thread: at 4 warps (32) ptxas spilled at K = 1, 4, 5, 6 under maxnreg=128


@triton.jit
def _viterbi_forward(x, cost, arg, start, n_tiles, K: tl.constexpr, BOOK: tl.constexpr, HAS_START: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    """The forward pass of quant/trellis.py's Viterbi for one tile per program, all 256 steps in one launch. A path
    cost is kept per state suffix (its low 16 - K bits, which the next state begins with): step i's cost of suffix
    e is the least over the 2^K states (h, e) of their squared error, computed as the torch pass computes it
    ((v² + (-2x) v), the codebook value v in registers), plus the cost of their own predecessor suffix (the state's
    top 16 - K bits). So a step reads and writes 2^(16-K) costs (two buffers in cost, a barrier between steps)
    instead of 2^16, and records which h was cheapest in arg [256, tiles, 2^(16-K)] (uint8), which the way back
    follows. The costs after the last step are left in cost[:, 0]. A block of BLOCK states is a [2^K, BQ, BR] tensor:
    every h for the suffixes q 2^K + r of BQ values of q and BR of r, so that the predecessors' costs, at (h << (16 -
    2K)) + q, are read as contiguous rows and shared along r (a gather per state issued 1.2-1.5x the instructions at
    K = 2, 3, 5)."""
    t = tl.program_id(0)
    LOW: tl.constexpr = 65536 >> K
    P: tl.constexpr = 1 << K
    BE: tl.constexpr = BLOCK // P
    BR: tl.constexpr = P if P * P <= BLOCK else BLOCK // P
    BQ: tl.constexpr = BLOCK // (P * BR)
    buf = cost + t.to(tl.int64) * 2 * LOW
    h = tl.arange(0, P)
    for b in range(0, LOW, BE):  # before position 0: any suffix, or the start state's alone
        e = b + tl.arange(0, BE)
        if HAS_START:
            init = tl.where(e == tl.load(start + t) % LOW, 0.0, float("inf"))
        else:
            init = tl.zeros([BE], dtype=tl.float32)
        tl.store(buf + e, init)
    tl.debug_barrier()
    for i in range(256):
        prev = buf + (i % 2) * LOW
        cur = buf + ((i + 1) % 2) * LOW
        x2 = tl.load(x + t * 256 + i) * -2.0
        for j in range(65536 // BLOCK):
            q = (j // (P // BR)) * BQ + tl.arange(0, BQ)
            r = (j % (P // BR)) * BR + tl.arange(0, BR)
            e = q[:, None] * P + r[None, :]  # [BQ, BR]: suffixes q * 2^K + r
            v = _value((h[:, None, None] << (16 - K)) | e[None, :, :], BOOK)  # [P, BQ, BR]: the states (h, e)
            before = tl.load(prev + (h[:, None] << (16 - 2 * K)) + q[None, :])  # [P, BQ]: their predecessors' costs
            least, which = tl.min((v * v + x2 * v) + before[:, :, None], axis=0, return_indices=True)
            tl.store(cur + e, least)
            tl.store(arg + (i * n_tiles + t).to(tl.int64) * LOW + e, which.to(tl.uint8))
        tl.debug_barrier()


@triton.jit
def _viterbi_back(arg, end, states, n_tiles, K: tl.constexpr):
    """The way back of _viterbi_forward for one tile per program: from its end state, each step's state is the
    cheapest h the forward pass recorded for the suffix the next state begins with; the 256 states into states
    [T, 256] (int32)."""
    t = tl.program_id(0)
    LOW: tl.constexpr = 65536 >> K
    state = tl.load(end + t)
    for back in range(255):
        i = 255 - back
        tl.store(states + t * 256 + i, state)
        e = state >> K
        state = (tl.load(arg + ((i - 1) * n_tiles + t).to(tl.int64) * LOW + e).to(tl.int32) << (16 - K)) | e
    tl.store(states + t * 256, state)


def viterbi(x: torch.Tensor, k: int, book: str, start: torch.Tensor | None, arg: torch.Tensor) -> torch.Tensor:
    """quant/trellis.py's Viterbi pass over x [T, 256] fp32 in two kernels: states long [T, 256] of the cheapest
    path, which with start [T] begins after that state and ends in it, else begins anywhere and ends where it is
    cheapest. arg [256, >= T, 2^(16-K)] uint8 is scratch (T columns used)."""
    t, low = x.shape[0], 65536 >> k
    cost = torch.empty(t, 2, low, dtype=torch.float32, device=x.device)
    start_t = start.to(torch.int32).contiguous() if start is not None else cost
    _viterbi_forward[(t,)](x.contiguous(), cost, arg, start_t, arg.shape[1], K=k, BOOK=BOOK_IDS[book],
                           HAS_START=start is not None, BLOCK=VITERBI_BLOCK, num_warps=VITERBI_WARPS,
                           maxnreg=128)  # fmt: skip
    if start is None:  # the cheapest end: the cheapest suffix, and the h the last step chose for it
        e = cost[:, 0].argmin(dim=1)
        start = (arg[255, :t].gather(1, e[:, None])[:, 0].long() << (16 - k)) | e
    states = torch.empty(t, 256, dtype=torch.int32, device=x.device)
    _viterbi_back[(t,)](arg, start.to(torch.int32).contiguous(), states, arg.shape[1], K=k)
    return states.long()
