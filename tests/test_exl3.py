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
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton tests: compiled on a GPU, else the interpreter


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
    got = exl3.decode_weight(golden[p + "trellis"], golden[p + "suh"], golden[p + "svh"], book)
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


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_both_layouts_of_the_torch_viterbi_find_the_same_symbols(k, monkeypatch):
    """The torch passes keep their costs symbol-major at small K and state-major above (trellis.H_MAJOR_K, for
    speed); either layout finds the same symbols bit for bit, the tail-biting start included, and so do ties (a
    target of zeros, where many paths cost the same)."""
    from quantkit.quant import trellis

    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(k)) * trellis.CODEBOOK_SCALE
    x[2] = 0.0
    codes = []
    for h_major_k in (0, 8):
        monkeypatch.setattr(trellis, "H_MAJOR_K", h_major_k)
        codes.append(trellis.encode(x, k, "mul1", backend="torch"))
    assert torch.equal(codes[0], codes[1])


def _greedy_symbols(x: torch.Tensor, k: int, book: str = "3inst") -> torch.Tensor:
    """A plain left-to-right code of x [T, 256]: each symbol the best for its own position given the ones before."""
    values = exl3.codebook(book)
    symbols = torch.zeros(x.shape[0], 256, dtype=torch.long)
    state = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(256):
        options = ((state[:, None] << k) & 0xFFFF) | torch.arange(1 << k)
        pick = (values[options] - x[:, i : i + 1]).abs().argmin(1)
        symbols[:, i], state = pick, options[torch.arange(len(pick)), pick]
    return symbols


def _greedy(w: torch.Tensor, k: int) -> torch.Tensor:
    n_in, n_out = w.shape
    tiles = w.reshape(n_in // 16, 16, n_out // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)[:, exl3.fragment_order()]
    return exl3.pack_symbols(_greedy_symbols(tiles, k), k).view(n_in // 16, n_out // 16, 16 * k)


def _greedy_build(tiny_models, dst: Path, monkeypatch, *options: str) -> dict:
    """`quantize --format exl3 OPTIONS` of the 64-wide tiny Mistral into dst with the greedy tile coder in place of
    Viterbi (the pipeline, config, storage and loading are under test; Viterbi at this CPU's speed would take
    minutes and is tested above); returns the folder's quantization_config."""
    import json

    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.quant import trellis

    monkeypatch.setattr(trellis, "encode", _greedy_symbols)
    src = tiny_models.get("mistral_large")["hf"]
    args = ["quantize", src, dst, "--format", "exl3", *options, "--rows", "2", "--seq-len", "32", "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads((dst / "config.json").read_text())["quantization_config"]


def test_an_exl3_folder_quantizes_saves_loads_and_runs(tiny_models, tmp_path, monkeypatch):
    """--format exl3 end to end on the tiny Mistral (64 wide: every linear is padded to 128), greedy tile codes."""
    import json

    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.quantized_model import load_any

    src, dst = tiny_models.get("mistral_large")["hf"], tmp_path / "exl3"
    qcfg = _greedy_build(tiny_models, dst, monkeypatch, "--bits", "4")
    assert qcfg["quant_method"] == qcfg["format"] == "exl3" and qcfg["bits"] == 4 and qcfg["codebook"] == "mul1"
    assert qcfg["head_bits"] is None and "version" not in qcfg  # what GPTQModel's EXL3Config refuses
    k_proj = "model.layers.0.self_attn.k_proj"
    storage = qcfg["tensor_storage"][k_proj]
    assert storage["bits_per_weight"] == 4 and storage["quant_format"] == "exl3"
    assert storage["stored_tensors"][f"{k_proj}.trellis"] == {"shape": [8, 8, 64], "torch_dtype": "int16"}
    assert storage["stored_tensors"][f"{k_proj}.mul1"] == {"shape": [], "torch_dtype": "int32"}  # the codebook flag
    assert storage["mul1_multiplier"] == 0x83DCD12D  # as exllamav3's tensor map records it
    assert qcfg["quantkit"]["shapes"][k_proj] == [32, 64]  # [out, in] before padding to 128
    card = (dst / "README.md").read_text()  # the encoder's own settings, not GPTQ's, and who loads it
    assert "EXL3 trellis code" in card and "| Damp | 0.025 " in card and "| Codebook | mul1 |" in card
    assert not any(f"| {row} |" in card for row in ("Group size", "Act order", "Grid", "Hadamard rotation"))
    assert "GPTQ," not in card
    assert "GPTQModel: refuses this folder" in card and "multiples of 128" in card, card  # 64 wide: padded

    report = json.loads(CliRunner().invoke(main, ["inspect", str(dst), "--json"]).output)
    expected = (128 * 128 * 4 + 16 * 256 + 32) * 14 / (2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128))
    assert report["quantized"]["decoder_bpw"] == pytest.approx(expected)  # padding counted, over the real weights

    model = load_any(dst, "cpu", "float32", "torch", progress=False)
    stored = load_file(next(dst.glob("*.safetensors")))  # read by safetensors itself, not by quantkit's loader
    assert stored[f"{k_proj}.mul1"].view(torch.uint32).item() == 0x83DCD12D  # exllamav3's flag: the multiplier
    w = exl3.decode_weight(stored[f"{k_proj}.trellis"], stored[f"{k_proj}.suh"], stored[f"{k_proj}.svh"], "mul1")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    module = model.get_submodule("layers.0.self_attn.k_proj")
    with torch.no_grad():
        torch.testing.assert_close(module(x), x @ w[:64, :32])  # the padding cut away: in 64 of 128, out 32 of 128
    reference = load_any(src, "cpu", "float32", "torch", progress=False)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).float(), reference(ids).float()
    assert torch.isfinite(got).all() and float((got - want).norm() / want.norm()) < 1.0  # greedy codes: coarse



def test_exl3_bpw_chooses_k_per_linear_within_the_exact_budget(tiny_models, tmp_path, monkeypatch):
    """--bpw with --format exl3: each linear measured at the K its target can choose (greedy tile codes in place of
    Viterbi, as above), the knapsack picks K per block, and every stored bit (padding, suh, svh) counts against
    the target. On this 64-wide model K = 3 is 10.1 and K = 4 13.2 stored bits per real weight (padded to 128). The
    kept measurement.json names its window: K = 2 (the probe width) to 8, no K = 1."""
    import json

    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.quantized_model import load_any

    dst = tmp_path / "exl3-bpw"
    qcfg = _greedy_build(tiny_models, dst, monkeypatch, "--bpw", "11.5")
    assert qcfg["bits"] == 11.5  # exllamav3 writes the decoder's target bitrate here
    ks = {name: s["bits_per_weight"] for name, s in qcfg["tensor_storage"].items()}
    assert set(ks.values()) == {3, 4}, ks  # between the two uniform builds: some linears at each K
    for name, k in ks.items():  # each linear's trellis holds its own K
        assert qcfg["tensor_storage"][name]["stored_tensors"][f"{name}.trellis"]["shape"][-1] == 16 * k
    for layer in (0, 1):  # q/k/v share one K, as loaders that fuse them need
        assert len({ks[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}) == 1

    report = json.loads(CliRunner().invoke(main, ["inspect", str(dst), "--json"]).output)
    assert 10.1 < report["quantized"]["decoder_bpw"] <= 11.5
    meas = json.loads((tmp_path / ".exl3-bpw.quantkit-work" / "measurement.json").read_text())
    assert (meas["floor"], meas["reach"]) == (2.0, 13.0)
    names = {e["candidate"] for layer in meas["layers"] for b in ("attn", "mlp") for e in layer[b]}
    assert names == {f"exl3 {a}/{k}" for a in range(2, 9) for k in range(2, 9)}
    model = load_any(dst, "cpu", "float32", "torch", progress=False)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_an_exl3_target_measures_each_linear_within_one_and_a_half_bits_of_it():
    """--bpw 3.0 --format exl3 measures (and chooses among) K = 2..4 per linear, not all eight: each K a linear is
    measured at costs one trellis encode of it, and K = 1's is the slowest. A bound on the block's average alone
    would let o_proj reach K = 8 beside q/k/v at 1 (4.2 bits per weight on Mistral Large's shapes, under 3.0 + 1.5).
    K = 1 stays for targets up to 2.5, and no target leaves out K = 2, the width every block is probed at."""
    from quantkit.formats.registry import get_format
    from quantkit.formats.spec import QuantSettings
    from quantkit.quant.measure import block_table, floor_for, spec_for_candidate

    fmt, s = get_format("exl3"), QuantSettings(bits=3, group_size=None)
    layer = {"self_attn.q_proj": (12288, 12288), "self_attn.k_proj": (1024, 12288),
             "self_attn.v_proj": (1024, 12288), "self_attn.o_proj": (12288, 12288)}  # fmt: skip
    for target, ks in ((3.0, range(2, 5)), (2.5, range(1, 5)), (4.0, range(2, 6)), (6.0, range(2, 8))):
        table = block_table(fmt, "attn", False, layer, s, lambda n: None, fmt.reach_for(target),
                            floor_for(fmt, target))  # fmt: skip
        widths = {n: {spec_for_candidate(c, n, layer[n][1], s, None).bits for c, _ in table} for n in layer}
        assert widths == {n: set(ks) for n in layer}, target
        assert {c.name for c, _ in table} == {f"exl3 {a}/{k}" for a in ks for k in ks}
    everything = block_table(fmt, "attn", False, layer, s, lambda n: None)
    assert "exl3 1/8" in {c.name for c, _ in everything} and len(everything) == 64
    assert floor_for("quantkit", 3.0) is None and floor_for("gptq", 3.0) is None  # GPTQ grids: the whole table


def test_an_exl3_measurement_serves_targets_from_its_own_up_to_its_measure_for():
    """An EXL3 measurement leaves out K = 1 above 2.5, so one made for 4.0 cannot serve 2.5 (refused in one line,
    naming the remedy); --measure-for below --bpw lowers its floor instead, so that it serves both."""
    from quantkit.errors import QuantkitError
    from quantkit.formats.spec import QuantSettings
    from quantkit.quant.measure import check_reach
    from quantkit.quant.settings import QuantizeOptions

    made_for_4 = QuantizeOptions(QuantSettings(4, None), fmt="exl3", bpw=4.0)
    assert (made_for_4.measure_floor, made_for_4.measure_reach) == (2.0, 5.5)
    for target in (3.5, 4.0):
        check_reach(made_for_4.measure_reach, "exl3", target, "m", made_for_4.measure_floor)
    for target, words in ((2.5, "leaves out linears narrower than 2 bits"), (4.5, "was made for --bpw up to 4")):
        with pytest.raises(QuantkitError, match=words) as e:
            check_reach(made_for_4.measure_reach, "exl3", target, "m", made_for_4.measure_floor)
        assert "--measure-for" in str(e.value) and "\n" not in str(e.value)
    both = QuantizeOptions(QuantSettings(4, None), fmt="exl3", bpw=4.0, measure_for=2.5)
    assert (both.measure_floor, both.measure_reach) == (1.0, 5.5)
    check_reach(both.measure_reach, "exl3", 2.5, "m", both.measure_floor)
    check_reach(5.5, "exl3", 2.5, "an older measurement", None)  # made before floors: every width down to K = 1


def test_exl3_refuses_the_options_only_gptq_grids_use(tiny_models, tmp_path):
    """The trellis encoder has no groups, act order, grids or clipping and damps as exllamav3 does: those options
    given with --format exl3 are refused in one line (not silently ignored), and the plan names the codebook."""
    from click.testing import CliRunner

    from quantkit.cli import main

    src = tiny_models.get("mistral_large")["hf"]
    base = ["quantize", str(src), str(tmp_path / "x"), "--format", "exl3", "--dry-run", "--rows", "2"]
    for extra, named in ((["--damp", "0.05"], "--damp"), (["--group-size", "32", "--asym"], "--group-size, --sym"),
                         (["--no-act-order"], "--act-order / --no-act-order"), (["--no-clip"], "--clip")):  # fmt: skip
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 1 and f"drop {named}" in result.output, result.output
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0 and "format: exl3; 4 bits" in result.output and "codebook mul1" in result.output
    assert "group" not in result.output.splitlines()[0] and not (tmp_path / "x").exists()


def test_exl3_takes_one_bit_per_weight(tiny_models, tmp_path, monkeypatch):
    """K = 1 (the format's narrowest; GPTQ grids stop at 2): a --bits 1 folder stores 16-bit-per-tile streams and
    runs; the other formats still refuse 1 bit."""
    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.quantized_model import load_any

    src, dst = tiny_models.get("mistral_large")["hf"], tmp_path / "exl3-k1"
    storage = _greedy_build(tiny_models, dst, monkeypatch, "--bits", "1")["tensor_storage"]
    assert {s["bits_per_weight"] for s in storage.values()} == {1}
    name = "model.layers.0.self_attn.k_proj"
    assert storage[name]["stored_tensors"][f"{name}.trellis"]["shape"] == [8, 8, 16]
    model = load_any(dst, "cpu", "float32", "torch", progress=False)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None])).all()
    refused = CliRunner().invoke(main, [str(a) for a in ["quantize", src, tmp_path / "g1", "--bits", "1", "--quiet"]])
    assert refused.exit_code != 0 and "bits, not 1" in refused.output


def test_the_exl3_solver_beats_gptq_at_equal_bits_on_a_correlated_hessian():
    """solve_trellis (regularization, Hadamard both sides, LDLQ over bands of 16 rows, Viterbi) against GPTQ g128
    act order at 3 bits (3.25 bits per weight with its scales; EXL3 3.25 with suh and svh at this size): the
    proxy loss tr(E H Eᵀ) / tr(W H Wᵀ) on inputs with correlated, unevenly scaled features. Measured here: 0.0088
    vs 0.0239 (2.7x lower; 4.1x at 2 bits, 2.2x at 4)."""
    from quantkit.formats.spec import LinearSpec, QuantSettings
    from quantkit.quant.capture import solve_linear
    from quantkit.quant.gptq import proxy_loss
    from quantkit.quant.trellis import solve_trellis

    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) / 128**0.5 + torch.eye(128)
    x = torch.randn(2048, 128, generator=g) @ mix * torch.linspace(0.2, 3, 128)
    h = x.T @ x / 2048
    ours = solve_trellis(w, h, LinearSpec(3, None), QuantSettings(3))
    gptq = solve_linear(w, h, LinearSpec(3, 128), QuantSettings(3, 128))
    assert ours.rel_loss == pytest.approx(proxy_loss(w, ours.weight, h)[1])
    assert ours.rel_loss < 0.6 * proxy_loss(w, gptq.weight, h)[1], (ours.rel_loss, proxy_loss(w, gptq.weight, h)[1])
    assert ours.tensors["trellis"].shape == (8, 8, 48) and ours.tensors["suh"].dtype == torch.float16


@pytest.mark.parametrize("book", exl3.CODEBOOKS)
def test_the_triton_decode_kernel_equals_gptqmodels_tiles_bit_for_bit(golden, book):
    """kernels/exl3_triton.py (in Triton's interpreter here: CPU tensors) against the same fixture, every K."""
    from quantkit.kernels import exl3_triton

    for k in range(1, 9):
        got = exl3_triton.decode_inner(golden[f"{book}.k{k}.trellis"].to(DEV), book).cpu()
        assert torch.equal(got.view(torch.int32), golden[f"{book}.k{k}.inner"].view(torch.int32)), k


@pytest.mark.parametrize("book", exl3.CODEBOOKS)
def test_the_triton_gemv_equals_the_reference_decoder_times_x(golden, book):
    """kernels/exl3_triton.py's GEMV (tiles decoded in registers, both Hadamard transforms fused) against x @ W with
    W from the reference decoder: GPTQModel's linear for each codebook, and random trellises at K = 1, 3, 8 on a
    [256, 384] linear whose inputs are split over two programs (the partial sums added atomically)."""
    from quantkit.kernels import exl3_triton

    g = torch.Generator().manual_seed(0)
    p = f"{book}.full."
    cases = [(golden[p + "trellis"], golden[p + "suh"], golden[p + "svh"], None)]
    for k in (1, 3, 8):
        trellis = torch.randint(-(1 << 15), 1 << 15, (16, 24, 16 * k), generator=g, dtype=torch.int32).to(torch.int16)
        suh, svh = (torch.rand(256, generator=g) + 0.5).half(), (torch.rand(384, generator=g) - 0.5).half()
        cases.append((trellis, suh, svh, 2))
    for trellis, suh, svh, splits in cases:
        w = exl3.decode_weight(trellis, suh, svh, book)
        for m in (1, 5, 16):
            x = torch.randn(m, w.shape[0], generator=g)
            got = exl3_triton.gemv(*(t.to(DEV) for t in (x, trellis, suh, svh)), book, splits=splits).cpu()
            torch.testing.assert_close(got, x @ w, rtol=1e-5, atol=1e-5 * float((x @ w).abs().max()))
    with pytest.raises(ValueError, match="gemv takes"):
        exl3_triton.gemv(torch.zeros(17, 128), golden[p + "trellis"], golden[p + "suh"], golden[p + "svh"], book)


def test_the_exl3_linear_on_triton_equals_its_torch_path(golden):
    """Exl3Linear on the Triton backend (GEMV for <= 16 rows, decode + matmul for more) against its torch path, on a
    linear cut to [120, 100] from its padded 128 x 128 storage, with a bias."""
    from quantkit.kernels.exl3_linear import Exl3Linear

    p = "mcg.full."
    tensors = {n: golden[p + n] for n in ("trellis", "suh", "svh")} | {"bias": torch.linspace(-1, 1, 120)}
    tensors = {n: t.to(DEV) for n, t in tensors.items()}
    torch_lin, triton_lin = Exl3Linear(tensors, 120, 100, "mcg"), Exl3Linear(tensors, 120, 100, "mcg")
    torch_lin.set_backend("torch")
    triton_lin.set_backend("triton")
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 100), (2, 10, 100)):  # 3 rows: the GEMV; 20 rows: decode + matmul
        x = torch.randn(*shape, generator=g).to(DEV)
        want = torch_lin(x)
        got = triton_lin(x)
        assert got.shape == want.shape == (*shape[:-1], 120)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert triton_lin._dense is None  # the Triton path keeps nothing dense


@pytest.mark.parametrize(("k", "book", "block"), [(2, "3inst", 16), (7, "mcg", 16), (3, "mul1", 16), (4, "mul1", 15)])
def test_the_triton_viterbi_finds_the_torch_encoders_codes(k, book, block, monkeypatch):
    """quant/trellis.py's encoder with its passes in kernels/exl3_triton.py's Viterbi kernels (forward and way back;
    the free pass and the one tied to its start state) finds codes as good as the torch encoder's. Not always the same
    symbols: torch's addcmul fuses its multiply-add (as a GPU does), the interpreter does not, and paths whose costs
    differ by less than fp32 resolves over 256 steps (256 ulps of the summed squares) tie; measured here, 3INST at
    K = 2 and mul1 at K = 3 and 4 gave the same symbols, mcg at K = 7 15 of 512 different at 1e-4 relative error.
    The kernel takes the 2^16 states in one block per step here, or in two (on a GPU: 16 blocks of 4096), which
    keeps the interpreter quick."""
    from quantkit.kernels import exl3_triton
    from quantkit.quant import trellis

    monkeypatch.setattr(exl3_triton, "VITERBI_BLOCK", 1 << block)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(k)) * trellis.CODEBOOK_SCALE
    want = trellis.encode(x, k, book, backend="torch")
    got = trellis.encode(x.to(DEV), k, book, backend="triton").cpu()
    values = exl3.codebook(book)
    err = [float(((values[exl3.symbol_states(c, k)] - x) ** 2).sum()) for c in (got, want)]
    resolution = 256 * torch.finfo(torch.float32).eps * float((x * x).sum())
    assert abs(err[0] - err[1]) <= resolution, (err, resolution)
    assert float((got == want).float().mean()) > 0.9


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_symbol_states_are_the_states_the_packed_stream_decodes_from(k):
    """formats/exl3.symbol_states (the encoder's view: states from symbols) against exl3.states of the packed
    stream (the decoder's view: 16-bit windows of the bitstream), tail-biting included."""
    symbols = torch.randint(0, 1 << k, (3, 256), generator=torch.Generator().manual_seed(k))
    packed = exl3.pack_symbols(symbols, k).view(1, 3, 16 * k)
    assert torch.equal(exl3.symbol_states(symbols, k), exl3.states(packed).reshape(3, 256))


def test_the_global_scale_search_matches_each_codebooks_spread(monkeypatch):
    """trellis.global_scale on Gaussian weights at the 3INST spread (what the input scales make of a rotated
    matrix): mul1's values spread about 1.0, not 1.24, so its best scale is well below 1 and codes the sample
    better than no scale. Greedy tile codes stand in for Viterbi (the search is under test, and any coder's best
    scale follows the codebook's spread)."""
    from quantkit.quant import trellis

    monkeypatch.setattr(trellis, "encode", _greedy_symbols)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * trellis.CODEBOOK_SCALE
    tiles = trellis.sample_tiles(w)
    assert tiles.shape == (4 * 3 + 2 * 8, 256)  # the wrapped diagonal 3 wide, and the 8 highest and lowest RMS
    g = trellis.global_scale(w, 2, "mul1")
    at_g, at_1 = trellis.coded_errors(tiles, 2, "mul1", [g, 1.0])
    assert 0.6 < g < 0.95 and at_g < at_1, (g, at_g, at_1)


def test_exl3_refuses_parts_its_config_cannot_describe_yet():
    """Its tensor_storage lists decoder linears and the head only, so a quantized vision tower is refused up front."""
    from quantkit.formats.spec import QuantSettings
    from quantkit.quant.settings import QuantizeOptions

    QuantizeOptions(QuantSettings(4, None), fmt="exl3", head_bits=6).check()
    with pytest.raises(QuantkitError, match="quantized vision tower yet: drop --vision quantize"):
        QuantizeOptions(QuantSettings(4, None), fmt="exl3", vision="quantize").check()
    QuantizeOptions(QuantSettings(4, None), fmt="gptq", head_bits=6, vision="quantize").check()  # others take them


def test_the_codebook_is_chosen_stored_and_flagged_as_exllamav3_flags_it(tiny_models, tmp_path, monkeypatch):
    """--codebook 3inst: no flag tensor, codebook 3inst in the config, and the folder decodes with 3INST; mcg: its
    flag holds MCG's multiplier; formats without a trellis refuse --codebook."""
    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.quantized_model import load_any

    for book in ("3inst", "mcg"):
        dst = tmp_path / book
        qcfg = _greedy_build(tiny_models, dst, monkeypatch, "--bits", "2", "--codebook", book)
        name = "model.layers.1.mlp.down_proj"
        stored = load_file(next(dst.glob("*.safetensors")))
        flags = ["mcg"] if book == "mcg" else []
        assert qcfg["codebook"] == book and {f"{name}.{t}" for t in ("trellis", "suh", "svh", *flags)} == {
            n for n in stored if n.startswith(name + ".")} == set(qcfg["tensor_storage"][name]["stored_tensors"])
        if book == "mcg":
            assert stored[f"{name}.mcg"].view(torch.uint32).item() == qcfg["tensor_storage"][name]["mcg_multiplier"]
        w = exl3.decode_weight(stored[f"{name}.trellis"], stored[f"{name}.suh"], stored[f"{name}.svh"], book)
        module = load_any(dst, "cpu", "float32", "torch", progress=False).get_submodule("layers.1.mlp.down_proj")
        assert module.codebook == book
        x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(module(x), x @ w[:128, :64])
    src = tiny_models.get("mistral_large")["hf"]
    refused = CliRunner().invoke(main, [str(a) for a in ["quantize", src, tmp_path / "g", "--codebook", "mcg"]])
    assert refused.exit_code != 0 and "has no codebook" in refused.output


def test_an_exl3_head_is_coded_listed_and_loaded(tiny_models, tmp_path, monkeypatch):
    """--head-bits 4 --format exl3 (exllamav3 defaults to 6; 4 keeps the greedy coder quick): lm_head coded at K = 4
    beside a K = 2 decoder,
    listed in tensor_storage and head_bits, counted by inspect, and run by the loader as an EXL3 linear whose output
    is x times the stored tensors' decoded weight."""
    import json

    from click.testing import CliRunner

    from quantkit.cli import main
    from quantkit.kernels.exl3_linear import Exl3Linear
    from quantkit.quantized_model import load_any

    dst = tmp_path / "exl3-head"
    qcfg = _greedy_build(tiny_models, dst, monkeypatch, "--bits", "2", "--head-bits", "4")
    assert qcfg["head_bits"] == 4 and qcfg["tensor_storage"]["lm_head"]["bits_per_weight"] == 4
    assert qcfg["tensor_storage"]["lm_head"]["stored_tensors"]["lm_head.trellis"]["shape"] == [8, 2048, 64]
    assert qcfg["quantkit"]["shapes"]["lm_head"] == [32768, 64]
    report = json.loads(CliRunner().invoke(main, ["inspect", str(dst), "--json"]).output)
    padded_bits = 128 * 32768 * 4 + 16 * (128 + 32768) + 32  # trellis, suh, svh and the mul1 flag
    assert report["quantized"]["head_bpw"] == pytest.approx(padded_bits / (32768 * 64))  # over its real weights
    stored = load_file(next(dst.glob("*.safetensors")))
    w = exl3.decode_weight(stored["lm_head.trellis"], stored["lm_head.suh"], stored["lm_head.svh"], "mul1")
    model = load_any(dst, "cpu", "float32", "torch", progress=False)
    assert isinstance(model.lm_head, Exl3Linear)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(x), x @ w[:64, :32768])
