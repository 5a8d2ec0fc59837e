"""The EXL3 trellis encoder: the K-bit code of a 16x16 tile closest to its target values (issue 27).

A tile's 256 weights, in stream order (formats/exl3.py), decode from the states of a cyclic bitstream: state i is
the 16-bit window ending at bit (i + 1) * K, so state i is state i-1 shifted left by K with the new symbol in its
low K bits. Finding the stream whose decoded values are closest (squared error) to the targets is a shortest path
through 2^16 states x 256 steps: Viterbi, vectorized over many tiles at once. Each step keeps, for every state, the
cheapest path ending there; a state's 2^K possible predecessors differ only in their top K bits, so the step is a
min over a [2^K, 2^(16-K)] view of the previous costs. The stream is tail-biting (the bits before position 0 are
its last 16), so as exllamav3 does, a first pass on the targets rotated by 128 positions finds the end state, and
a second pass starts from that state and must end in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from quantkit.formats import exl3
from quantkit.formats.exl3 import SIGMA_REG, padded
from quantkit.formats.spec import LinearSpec, QuantSettings
from quantkit.quant.gptq import proxy_loss

STATES = 1 << 16
SCRATCH_BYTES = 128 << 20  # per batch of tiles: the [256, tiles, 2^(16-K)] table of each step's predecessors

# At K <= H_MAJOR_K the costs are kept symbol-major ([T, 2^K, 2^(16-K)]: state j * 2^K + h at [h, j]), else
# state-major ([T, 2^(16-K), 2^K], the states' own order). Each step adds a state's best predecessor cost to its
# 2^K successors; torch broadcasts that over an inner dimension of 2 to 8 at a third of its speed over an outer one,
# and symbol-major keeps it outer for the price of transposing the 2^(16-K) minima (same codes bit for bit; 64 x
# 256 Gaussian weights, mul1, 2 threads, side by side: 1.5x / 1.4x / 1.5x faster at K = 1 / 2 / 3, none at 4-8).
H_MAJOR_K = 3


def _viterbi(x: torch.Tensor, k: int, book: str, start: torch.Tensor | None, best: torch.Tensor) -> torch.Tensor:
    """One pass over x [T, 256]: the states [T, 256] of the cheapest paths; with start [T] the path begins after
    that state and ends in it, else it begins anywhere and ends where it is cheapest. best [256, >= T, 2^(16-K)] is
    scratch: the forward pass keeps only each step's cheapest predecessor cost (a min, not an argmin: torch's min
    with indices over the strided view is 5x slower than amin), and the way back recomputes the 2^K predecessor
    costs of the one state it follows, with the same ops in the same order, so it picks the forward pass's path.
    (On a GPU, kernels/exl3_triton.py's viterbi runs the pass instead: 256 steps of small torch ops per batch would
    be bound by their launches.)"""
    t, n, low = x.shape[0], 1 << k, STATES >> k
    best = best[:, :t]
    values = exl3.codebook(book).to(x.device)
    square = values * values
    h_major = k <= H_MAJOR_K
    shape = (t, n, low) if h_major else (t, low, n)
    v3, sq3 = (values.view(low, n), square.view(low, n))
    if h_major:
        v3, sq3 = v3.T.contiguous(), sq3.T.contiguous()
    cost = torch.zeros(shape, device=x.device)
    rows = torch.arange(t, device=x.device)
    if start is not None:
        cost.fill_(float("inf"))
        if h_major:
            cost[rows, start & (n - 1), start >> k] = 0.0
        else:
            cost.view(t, STATES)[rows, start] = 0.0
    err = torch.empty_like(cost)
    minima = torch.empty(t, n, low >> k, device=x.device) if h_major else None
    for i in range(256):
        if h_major:  # state g * 2^(16-K) + j sits at [j mod 2^K, g * 2^(16-2K) + j >> K]
            torch.amin(cost.view(t, n, n, low >> k), dim=2, out=minima)
            best[i].view(t, low >> k, n).copy_(minima.transpose(1, 2))
            before = best[i][:, None, :]
        else:  # predecessors differ in their top K bits
            torch.amin(cost.view(t, n, low), dim=1, out=best[i])
            before = best[i][:, :, None]
        torch.addcmul(sq3, x[:, i, None, None], v3, value=-2.0, out=err)  # (c - x)^2 less x^2, alike for every c
        torch.add(err, before, out=cost)
    state = start if start is not None else (cost.transpose(1, 2) if h_major else cost).reshape(t, STATES).argmin(1)
    states = torch.empty(t, 256, dtype=torch.long, device=x.device)
    top = (torch.arange(1 << k, device=x.device) << (16 - k))[None, :]
    for i in range(255, 0, -1):
        states[:, i] = state
        pred = top | (state >> k)[:, None]  # [T, 2^K]: the states step i may have come from
        pred_cost = torch.addcmul(square[pred], x[:, i - 1 : i], values[pred], value=-2.0)
        pred_cost = pred_cost + best[i - 1, rows[:, None], pred >> k]
        state = pred.gather(1, pred_cost.argmin(dim=1, keepdim=True))[:, 0]
    states[:, 0] = state
    return states


def batch_tiles(k: int, device: torch.device | str = "cpu", entry_bytes: int = 4) -> int:
    """Tiles encoded at once at K bits: as many as SCRATCH_BYTES holds of the [256, tiles, 2^(16-K)] table a pass
    keeps (entry_bytes: the torch pass's fp32 costs, or the Triton kernel's byte per choice; on a GPU 16x the bytes:
    each tile is a program of the Viterbi kernel, and more of them fill more of its SMs; 1024 tiles at K = 3)."""
    scratch = SCRATCH_BYTES * (16 if torch.device(device).type == "cuda" else 1)
    return max(1, scratch // (256 * (STATES >> k) * entry_bytes))


def encode(x: torch.Tensor, k: int, book: str = "3inst", backend: str = "auto") -> torch.Tensor:
    """Symbols long [T, 256] (K bits each, stream order) of the tail-biting code closest to x [T, 256] (fp32). The
    passes run as Triton kernels where the kernels' backend resolves to Triton (a GPU), else in torch."""
    from quantkit.kernels import resolve_backend

    triton = resolve_backend(backend, x.device) == "triton"
    batch = batch_tiles(k, x.device, 1 if triton else 4)
    shape = (256, min(batch, x.shape[0]), STATES >> k)
    if triton:
        from quantkit.kernels.exl3_triton import viterbi

        one_pass = partial(viterbi, arg=torch.empty(shape, dtype=torch.uint8, device=x.device))
    else:
        one_pass = partial(_viterbi, best=torch.empty(shape, device=x.device))
    out = []
    for chunk in x.float().split(batch):
        states = one_pass(chunk.roll(-128, dims=1), k, book, None)  # position 255 sits at 127
        out.append(one_pass(chunk, k, book, states[:, 127]) & ((1 << k) - 1))
    return torch.cat(out)


def encode_matrix(w: torch.Tensor, k: int, book: str = "3inst") -> torch.Tensor:
    """The trellis int16 [in/16, out/16, 16 K] whose decoded Ŵ is closest, tile by tile, to w [in, out]."""
    n_in, n_out = w.shape
    tiles = w.float().reshape(n_in // exl3.TILE, exl3.TILE, n_out // exl3.TILE, exl3.TILE).permute(0, 2, 1, 3)
    stream = tiles.reshape(-1, 256)[:, exl3.fragment_order().to(w.device)]  # stream position e holds cell order[e]
    symbols = encode(stream, k, book)
    return exl3.pack_symbols(symbols, k).view(n_in // exl3.TILE, n_out // exl3.TILE, exl3.TILE * k)


CODEBOOK_SCALE = 1.24371088  # the 3inst / mcg codebooks' standard deviation (exllamav3's codebook_scale)
BAND = 16  # rows of Ŵ quantized together: one row of tiles
SCALE_GRID = tuple(0.1 + 0.2 * i for i in range(10))  # the global scale's coarse search, as exllamav3 searches it
SCALE_STEP = 0.075  # and its fine grid around the coarse minimum
SAMPLE_WIDTH = 3  # tiles of the wrapped diagonal the search codes per tile row


def sample_tiles(w: torch.Tensor, width: int = SAMPLE_WIDTH) -> torch.Tensor:
    """Tiles [T, 256] (stream order) of Ŵ [in, out] for the scale search: a wrapped diagonal `width` tiles wide,
    so every tile row and column is in it (outliers tend to be whole channels), and the tiles of highest and
    lowest RMS."""
    tk, tn = w.shape[0] // exl3.TILE, w.shape[1] // exl3.TILE
    w4 = w.reshape(tk, exl3.TILE, tn, exl3.TILE)
    n = max(tk, tn)
    i = torch.arange(n).repeat_interleave(width)
    rows, cols = i % tk, (i + torch.arange(width).repeat(n)) % tn
    ms = w4.square().mean(dim=(1, 3)).flatten()
    extremes = min(max(8, n * width // 16), (ms.numel() + 1) // 2)
    flat = torch.cat([ms.topk(extremes).indices, ms.topk(extremes, largest=False).indices]).cpu()
    rows, cols = torch.cat([rows, flat // tn]).to(w.device), torch.cat([cols, flat % tn]).to(w.device)
    return w4[rows, :, cols, :].reshape(-1, 256)[:, exl3.fragment_order().to(w.device)]


def search_weights(out_features: int, in_features: int) -> int:
    """Weights global_scale codes for a linear of this size (padded as stored): 10 scales on a third of the sample
    and 5 on all of it (what the dry run counts beside the linear's own coding)."""
    tk, tn = padded(in_features) // exl3.TILE, padded(out_features) // exl3.TILE
    n = max(tk, tn)
    sample = n * SAMPLE_WIDTH + 2 * min(max(8, n * SAMPLE_WIDTH // 16), (tk * tn + 1) // 2)
    return (len(SCALE_GRID) * -(-sample // 3) + 5 * sample) * 256


def coded_errors(tiles: torch.Tensor, k: int, book: str, scales: list[float]) -> list[float]:
    """For each scale s: the mean squared error of tiles coded as tiles * s and scaled back (one encode for all)."""
    batch = torch.cat([tiles * s for s in scales])
    values = exl3.codebook(book).to(tiles.device)[exl3.symbol_states(encode(batch, k, book), k)]
    return [float((v / s - tiles).square().mean()) for v, s in zip(values.split(tiles.shape[0]), scales, strict=True)]


def global_scale(w: torch.Tensor, k: int, book: str) -> float:
    """The factor Ŵ is multiplied by before coding (and its input scales divided by) that codes a sample of its
    tiles best: a coarse grid on a third of the sample, a fine grid around its minimum on all of it, refined by the
    parabola through the fine minimum and its neighbours. The codebooks' spreads differ (mul1's is about 1.0,
    3INST's 1.24), and a K-bit code's best scale sits at or below the plain spread match (0.9 for 3INST at K = 3)."""
    tiles = sample_tiles(w)
    coarse = coded_errors(tiles[::3], k, book, list(SCALE_GRID))
    center = SCALE_GRID[coarse.index(min(coarse))]
    fine_scales = [center + SCALE_STEP * (i - 2) for i in range(5)]
    fine = coded_errors(tiles, k, book, fine_scales)
    b = fine.index(min(fine))
    offset = 0.0
    if 0 < b < 4 and (curve := fine[b - 1] - 2 * fine[b] + fine[b + 1]) > 0:
        offset = max(-0.5, min(0.5, 0.5 * (fine[b - 1] - fine[b + 1]) / curve))
    return max(fine_scales[b] + offset * SCALE_STEP, 0.01)


def _rms(x: torch.Tensor, dim: int) -> torch.Tensor:
    r = x.square().mean(dim=dim, keepdim=True).sqrt()
    return torch.where(r > 1e-30, r, torch.full_like(r, 0.1))


def solve_exl3(
    weight: torch.Tensor, hessian: torch.Tensor, k: int, seed: int = 0, book: str = exl3.DEFAULT_CODEBOOK
) -> dict[str, torch.Tensor]:
    """The EXL3 tensors (trellis, suh, svh) of an nn.Linear weight [out, in] (both multiples of 128) calibrated
    by H [in, in] = E[x xᵀ]. As exllamav3 regularizes: random signs on both sides, output channels scaled to a common
    RMS, output Hadamard, input channels scaled so that rows match the codebook's spread, input Hadamard; then the
    bands of 16 rows of Ŵ are coded in order with LDLQ error feedback (blocked GPTQ: each band's coding error is
    spread over the rows not yet coded, weighted by the Hessian in the rotated basis, Hz = H' diag(su) H diag(su)
    H' with H' the blocked Hadamard). Before coding, Ŵ is scaled by the global_scale that codes a sample of its
    tiles best (the input scales divided by it), as exllamav3 does."""
    n_out, n_in = weight.shape
    g = torch.Generator().manual_seed(seed)
    w = weight.float().T.contiguous()  # [in, out]: y = x w
    su = (torch.randint(0, 2, (n_in, 1), generator=g).float() * 2 - 1).to(w.device)  # CPU draws: any device alike
    sv = (torch.randint(0, 2, (1, n_out), generator=g).float() * 2 - 1).to(w.device)
    out_scale = _rms(w, 0)
    sv = sv * out_scale / out_scale.mean()
    w = exl3.blocked_hadamard(w / sv, 1)
    su = -su * _rms(w, 1) / CODEBOOK_SCALE
    su = su / global_scale(exl3.blocked_hadamard(w / su, 0), k, book)
    suh, svh = su.flatten().half(), sv.flatten().half()  # what is stored, and what the code must be fitted to
    w = exl3.blocked_hadamard(weight.float().T / suh.float()[:, None] / svh.float()[None, :], 1)
    w = exl3.blocked_hadamard(w, 0)  # Ŵ's target: H diag(1/suh) W diag(1/svh) H, with the stored fp16 scales

    h = hessian.float() * suh.float()[:, None] * suh.float()[None, :]
    h = exl3.blocked_hadamard(exl3.blocked_hadamard(h, 0), 1)
    h.diagonal().add_(SIGMA_REG * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H⁻¹ = Uᵀ U
    trellis = torch.empty(n_in // exl3.TILE, n_out // exl3.TILE, exl3.TILE * k, dtype=torch.int16, device=w.device)
    for r in range(0, n_in, BAND):
        band = w[r : r + BAND]
        code = encode_matrix(band, k, book)
        trellis[r // BAND] = code[0]
        err = torch.linalg.solve_triangular(u[r : r + BAND, r : r + BAND].T, band - exl3.decode_inner(code, book),
                                            upper=False)  # band error x U_bb⁻¹, in Ŵ's orientation  # fmt: skip
        w[r + BAND :] -= u[r : r + BAND, r + BAND :].T @ err
    return {"trellis": trellis, "suh": suh, "svh": svh, **exl3.codebook_flag(book)}


@dataclass
class TrellisSolved:
    """A linear coded by solve_trellis: its stored tensors (padded to multiples of 128) and its dequantized weight."""

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor  # [out, in], padding cut away
    rel_loss: float
    damp: float = SIGMA_REG


def solve_trellis(weight: torch.Tensor, hessian: torch.Tensor, spec: LinearSpec, s: QuantSettings) -> TrellisSolved:
    """solve_exl3 at spec.bits for a linear of any shape: padded with zero weights and zero Hessian entries (the
    padded inputs are always zero; solve_exl3's damping keeps H positive definite), coded, cut back. The rotation
    seed is the spec's, else 0; the codebook the settings' (exllamav3's default when they name none)."""
    n_out, n_in = weight.shape
    w = torch.zeros(padded(n_out), padded(n_in), device=weight.device)
    w[:n_out, :n_in] = weight.float()
    h = torch.zeros(padded(n_in), padded(n_in), device=weight.device)
    h[:n_in, :n_in] = hessian.float()
    book = s.codebook or exl3.DEFAULT_CODEBOOK
    tensors = solve_exl3(w, h, spec.bits, seed=spec.rotate_seed or 0, book=book)
    dense = exl3.decode_weight(tensors["trellis"], tensors["suh"], tensors["svh"], book).T[:n_out, :n_in]
    return TrellisSolved(tensors, dense.contiguous(), proxy_loss(weight, dense, hessian)[1])
