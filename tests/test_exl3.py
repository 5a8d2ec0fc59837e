"""The EXL3 reference decoder (quantkit/formats/exl3.py) against GPTQModel's CPU decoder, bit for bit: every codebook
at K = 1..8 (Ŵ), and a whole 128 x 128 linear per codebook (W with the Hadamard transforms and scales). The expected
values were written by GPTQModel 7.7 (tests/interop/exl3_golden.py, in its own venv); this test needs only quantkit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.errors import QuantkitError
from quantkit.formats import exl3

GOLDEN = Path(__file__).parent / "data" / "exl3_gptqmodel.safetensors"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


@pytest.mark.parametrize("book", exl3.CODEBOOKS)
@pytest.mark.parametrize("k", range(1, 9))
def test_decoded_tiles_equal_gptqmodels_bit_for_bit(golden, book, k):
    trellis, want = golden[f"{book}.k{k}.trellis"], golden[f"{book}.k{k}.inner"]
    got = exl3.decode_inner(trellis, book)
    assert got.shape == want.shape == (32, 48)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("book", exl3.CODEBOOKS)
def test_a_whole_linear_equals_gptqmodels_weight(golden, book):
    p = f"{book}.full."
    got = exl3.dequantize(golden[p + "trellis"], golden[p + "suh"], golden[p + "svh"], book)
    want = golden[p + "weight"]
    assert got.shape == want.shape == (128, 128)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # two fp32 matmuls: summation order may differ


def test_states_are_the_cyclic_windows_of_the_stream():
    """A separate reading of the layout: pack known symbols by hand and find them in the states."""
    k = 3
    symbols = torch.randint(0, 1 << k, (256,), generator=torch.Generator().manual_seed(1))
    bits = [(int(s) >> (k - 1 - j)) & 1 for s in symbols for j in range(k)]  # top bit first
    words = [int("".join(map(str, bits[i : i + 16])), 2) for i in range(0, len(bits), 16)]
    swapped = [w for a, b in zip(words[::2], words[1::2], strict=True) for w in (b, a)]
    trellis = torch.tensor(swapped, dtype=torch.int32).to(torch.int16).view(1, 1, 16 * k)
    states = exl3.states(trellis)[0, 0]
    for i in (0, 1, 5, 100, 255):
        window = [bits[(i + 1) * k - 16 + j] for j in range(16)]  # negative indices wrap: tail-biting
        assert int(states[i]) == int("".join(map(str, window)), 2)
    assert int(states[7]) & 0b111 == int(symbols[7])  # the last K bits of a state are its own symbol


def test_codebooks_spread_like_the_gaussians_they_code():
    """Each codebook's 2^16 values are centred with a spread near one (the Hadamard-rotated weights the trellis
    codes are close to Gaussian): measured std 1.244 (3inst, mcg) and 1.000 (mul1)."""
    for book in exl3.CODEBOOKS:
        values = exl3.codebook(book)
        assert torch.isfinite(values).all() and abs(float(values.mean())) < 0.01
        assert 0.95 < float(values.std()) < 1.3 and float(values.abs().max()) < 4, book


def test_bad_shapes_are_refused():
    with pytest.raises(QuantkitError, match="16 \\* K words"):
        exl3.decode_inner(torch.zeros(1, 1, 20, dtype=torch.int16), "3inst")
    with pytest.raises(QuantkitError, match="unknown EXL3 codebook"):
        exl3.codebook("nope")
    with pytest.raises(QuantkitError, match="divisible by 128"):
        exl3.blocked_hadamard(torch.zeros(64, 128), 0)


def test_packed_symbols_read_back_as_the_same_stream():
    k = 5
    symbols = torch.randint(0, 1 << k, (3, 256), generator=torch.Generator().manual_seed(2))
    trellis = exl3.pack_symbols(symbols, k)
    assert trellis.shape == (3, 16 * k) and trellis.dtype == torch.int16
    assert torch.equal(exl3.states(trellis.view(3, 1, 16 * k))[:, 0] & 31, symbols)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_the_encoder_finds_a_code_at_least_as_close_as_a_greedy_one(k):
    """Viterbi's squared error, decoded through the real layout, is never above a greedy code's (each symbol chosen
    for its own position given the ones before) and falls with K; a tile's error is what the decoder returns."""
    from quantkit.quant import trellis

    g = torch.Generator().manual_seed(k)
    w = torch.randn(32, 16, generator=g) * exl3.codebook("3inst").std()
    code = trellis.encode_matrix(w, k)
    assert code.shape == (2, 1, 16 * k)
    viterbi = float(((exl3.decode_inner(code, "3inst") - w) ** 2).mean())
    greedy = float(((exl3.decode_inner(_greedy(w, k), "3inst") - w) ** 2).mean())
    assert viterbi <= greedy, (viterbi, greedy)
    bound = {1: 0.6, 2: 0.2, 3: 0.05, 4: 0.015, 8: 1e-4}[k]  # relative to the targets' variance (~1.55)
    assert viterbi / float(w.var()) < bound, viterbi / float(w.var())


def _greedy(w: torch.Tensor, k: int) -> torch.Tensor:
    """A plain left-to-right code: each symbol the best for its own position given the symbols before it."""
    book = exl3.codebook("3inst")
    n_in, n_out = w.shape
    tiles = w.reshape(n_in // 16, 16, n_out // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)[:, exl3.fragment_order()]
    symbols = torch.zeros(tiles.shape[0], 256, dtype=torch.long)
    state = torch.zeros(tiles.shape[0], dtype=torch.long)
    for i in range(256):
        options = ((state[:, None] << k) & 0xFFFF) | torch.arange(1 << k)
        pick = (book[options] - tiles[:, i : i + 1]).abs().argmin(1)
        symbols[:, i], state = pick, options[torch.arange(len(pick)), pick]
    return exl3.pack_symbols(symbols, k).view(n_in // 16, n_out // 16, 16 * k)
