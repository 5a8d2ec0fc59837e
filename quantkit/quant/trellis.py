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

import torch

from quantkit.formats import exl3

STATES = 1 << 16
BACKPOINTER_BYTES = 256 << 20  # per batch of tiles: the [256, tiles, 2^(16-K)] table of chosen predecessors


def _viterbi(x: torch.Tensor, k: int, book: torch.Tensor, start: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One pass over x [T, 256]: (symbols [T, 256], states [T, 256]) of the cheapest paths; with start [T] the path
    begins after that state and ends in it, else it begins anywhere and ends where it is cheapest."""
    t, low = x.shape[0], STATES >> k
    cost = torch.zeros(t, STATES, device=x.device)
    if start is not None:
        cost.fill_(float("inf"))
        cost[torch.arange(t), start] = 0.0
    back = torch.empty(256, t, low, dtype=torch.uint8, device=x.device)
    square = book * book
    for i in range(256):
        best, back[i] = cost.view(t, 1 << k, low).min(dim=1)  # predecessors differ in their top K bits
        err = torch.addcmul(square, x[:, i : i + 1], book, value=-2.0)  # (c - x)^2 less x^2, the same for every c
        cost = (err.view(t, low, 1 << k) + best[:, :, None]).view(t, STATES)
    state = start if start is not None else cost.argmin(dim=1)
    states = torch.empty(t, 256, dtype=torch.long, device=x.device)
    rows = torch.arange(t, device=x.device)
    for i in range(255, -1, -1):
        states[:, i] = state
        suffix = state >> k
        state = (back[i, rows, suffix].long() << (16 - k)) | suffix
    return states & ((1 << k) - 1), states


def encode(x: torch.Tensor, k: int, book: str = "3inst") -> torch.Tensor:
    """Symbols long [T, 256] (K bits each, stream order) of the tail-biting code closest to x [T, 256] (fp32)."""
    values = exl3.codebook(book).to(x.device)
    batch = max(1, BACKPOINTER_BYTES // (256 * (STATES >> k)))
    out = []
    for chunk in x.float().split(batch):
        _, states = _viterbi(chunk.roll(-128, dims=1), k, values, None)  # position 255 sits at 127
        symbols, _ = _viterbi(chunk, k, values, states[:, 127])
        out.append(symbols)
    return torch.cat(out)


def encode_matrix(w: torch.Tensor, k: int, book: str = "3inst") -> torch.Tensor:
    """The trellis int16 [in/16, out/16, 16 K] whose decoded Ŵ is closest, tile by tile, to w [in, out]."""
    n_in, n_out = w.shape
    tiles = w.float().reshape(n_in // exl3.TILE, exl3.TILE, n_out // exl3.TILE, exl3.TILE).permute(0, 2, 1, 3)
    stream = tiles.reshape(-1, 256)[:, exl3.fragment_order()]  # stream position e holds tile cell order[e]
    symbols = encode(stream, k, book)
    return exl3.pack_symbols(symbols, k).view(n_in // exl3.TILE, n_out // exl3.TILE, exl3.TILE * k)
