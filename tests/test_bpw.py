"""quantize --bpw: realized bits per weight, determinism, measurement reuse, and refused targets/measurements.

The tiny model's k/v projections are 64 rows wide, where act order's int32 permutation alone costs half a bit per
weight; the tests use --no-act-order so that 2.5 bpw is reachable.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from same_output import assert_same_files

from quantkit.cli import main

NUMEL = 2 * (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256)  # the decoder linears of the tiny model's two layers
ARGS = ["--group-size", "64", "--no-act-order", "--rows", "4", "--seq-len", "64", "--measure-rows", "2", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def reachable(meas: dict) -> tuple[float, float]:
    """(lowest, highest) bpw a measurement allows: every block's cheapest or dearest candidate."""
    blocks = [layer[b] for layer in meas["layers"] for b in ("attn", "mlp")]
    return tuple(sum(pick(c["bits"] for c in block) for block in blocks) / NUMEL for pick in (min, max))


def decoder_bpw(folder) -> float:
    result = run("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["quantized"]["decoder_bpw"]


@pytest.fixture(scope="module")
def measured(tiny_models, tmp_path_factory, fresh_bpw_build):
    """A fresh --bpw 3.0 run measured for every target (--measure-for 9); its measurement.json is kept for them."""
    src, root = tiny_models.get("mistral_bpw")["hf"], tmp_path_factory.mktemp("bpw")
    return src, root, fresh_bpw_build(src, root, [*ARGS, "--measure-for", "9"])


@pytest.mark.parametrize("target", [2.5, 3.0, 4.0, 5.0])
def test_realized_bpw_hits_the_target(measured, target):
    src, root, measurement = measured
    out = root / f"q{target}"
    result = run("quantize", src, out, "--bpw", target, "--measurement", measurement, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    realized = decoder_bpw(out)  # from the stored tensors' bytes: codes, scales, zeros, perm, segment tables
    assert target - 0.02 <= realized <= target + 1e-9, realized
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantkit" and cfg["bpw"] == target
    widths = {
        b
        for m in cfg["modules"].values()
        for b in ([m["bits"]] if isinstance(m["bits"], int) else [x for x, _ in m["bits"]])
    }
    assert len(widths) > 1  # mixed: not one uniform width


def test_measurement_reuse_matches_a_fresh_measurement(measured):
    src, root, measurement = measured
    out = root / "reused3"
    assert run("quantize", src, out, "--bpw", "3.0", "--measurement", measurement, *ARGS).exit_code == 0
    assert_same_files(root / "fresh3", out, "*.safetensors")  # the model cards name their folders


def test_allocation_is_deterministic(measured):
    from quantkit.model.load import Checkpoint, build_model
    from quantkit.quant.allocate import allocate
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.plan import linear_shapes

    src, _, measurement = measured
    model = build_model(Checkpoint(src).config)
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    meas = json.loads(measurement.read_text())
    s = QuantSettings(bits=4, group_size=64, act_order=False)
    a, b = (allocate(meas, shapes, 3.3, s, lambda i, n: None, "quantkit") for _ in range(2))
    assert a.specs == b.specs and a.bits == b.bits
    assert a.bits <= 3.3 * a.numel and a.bpw > 3.28


def test_a_measurement_without_the_targets_probe_width_is_refused(measured):
    """--bpw reads the 2-bit probes: a measurement that holds only 3-bit ones is refused, naming the width."""
    from quantkit.errors import QuantkitError
    from quantkit.model.load import Checkpoint, build_model
    from quantkit.quant.allocate import allocate
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.plan import linear_shapes

    src, _, measurement = measured
    model = build_model(Checkpoint(src).config)
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    meas = json.loads(measurement.read_text())
    assert meas["probe"]["bits"] == [2]
    meas["probe"] = {**meas["probe"], "bits": [3]}
    s = QuantSettings(bits=4, group_size=64, act_order=False)
    with pytest.raises(QuantkitError, match="no 2-bit probes"):
        allocate(meas, shapes, 3.0, s, lambda i, n: None, "quantkit")


def test_the_range_ends_are_reachable(measured):
    """At the lowest reachable target every linear gets 2 bits per channel, at the highest 8 (the knapsack once
    failed at the lowest one: its rounded-up costs did not fit)."""
    from quantkit.model.load import Checkpoint, build_model
    from quantkit.quant.allocate import allocate
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.plan import linear_shapes

    src, _, measurement = measured
    model = build_model(Checkpoint(src).config)
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    meas = json.loads(measurement.read_text())
    s = QuantSettings(bits=4, group_size=64, act_order=False)
    blocks = [layer[b] for layer in meas["layers"] for b in ("attn", "mlp")]
    numel = sum(o * i for layer in shapes for o, i in layer.values())
    lo = sum(min(c["bits"] for c in block) for block in blocks)
    hi = sum(max(c["bits"] for c in block) for block in blocks)
    low = allocate(meas, shapes, lo / numel + 1e-12, s, lambda i, n: None, "quantkit")
    assert low.bits == lo and {sp.bits for layer in low.specs for sp in layer.values()} == {2}
    assert {sp.group_size for layer in low.specs for sp in layer.values()} == {None}  # per-channel is cheapest
    high = allocate(meas, shapes, hi / numel, s, lambda i, n: None, "quantkit")
    assert high.bits == hi and {sp.bits for layer in high.specs for sp in layer.values()} == {8}


def test_target_outside_the_range_is_refused(measured, tmp_path):
    src, _, measurement = measured
    lo, hi = reachable(json.loads(measurement.read_text()))
    assert 2.0 < lo < 2.3 and 8 < hi < 8.5
    for target in (1.5, 9.0):
        result = run("quantize", src, tmp_path / "out", "--bpw", target, "--measurement", measurement, *ARGS)
        assert result.exit_code == 1
        assert f"--bpw {target} is outside what this model can reach: {lo:.3f} to {hi:.3f}" in result.stderr
        assert not (tmp_path / "out").exists()


def test_foreign_measurement_is_refused(measured, tiny_models, tmp_path):
    src, _, measurement = measured
    other = ["--group-size", "32", *ARGS[2:]]
    result = run("quantize", src, tmp_path / "a", "--bpw", "3.0", "--measurement", measurement, *other)
    assert result.exit_code == 1 and "made for another model or other settings" in result.stderr
    assert "group_size" in result.stderr
    other_model = tiny_models.get("mistral_large")["hf"]
    result = run("quantize", other_model, tmp_path / "b", "--bpw", "3.0", "--measurement", measurement, *ARGS)
    assert result.exit_code == 1 and "source" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_lowest_target_builds_and_runs(measured, tmp_path):
    """Per-channel candidates at the bottom of the range export and load like the grouped ones."""
    src, _, measurement = measured
    lo, _ = reachable(json.loads(measurement.read_text()))
    out = tmp_path / "lowest"
    result = run("quantize", src, out, "--bpw", lo + 1e-9, "--measurement", measurement, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert lo - 0.02 <= decoder_bpw(out) <= lo + 1e-9
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["group_size"] for m in modules.values()} == {None}
    result = run("eval", out, "--reference", src, "--rows", "2", "--seq-len", "32", "--json", "--quiet")
    assert result.exit_code == 0, result.output + str(result.exception)
    assert 0 < json.loads(result.stdout)["kl_divergence"] < 5


def test_the_allocation_trades_widths_across_the_whole_table():
    """No width window: at uniform 3-bit's size, a block whose probe says the model depends on it goes as far above
    the target as the format reaches (2.5 bits per weight), paid for by the others going below 3 (per-channel or
    2-bit grids); the predicted KL is the square law through each block's 2-bit probe."""
    from quantkit.formats.registry import get_format
    from quantkit.formats.spec import PER_CHANNEL
    from quantkit.quant.allocate import _table, allocate
    from quantkit.quant.capture import QuantSettings

    layer = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (64, 256), "self_attn.v_proj": (64, 256),
             "self_attn.o_proj": (256, 256), "mlp.gate_proj": (512, 256), "mlp.up_proj": (512, 256),
             "mlp.down_proj": (256, 512)}  # fmt: skip
    shapes = [dict(layer) for _ in range(3)]
    s = QuantSettings(bits=4, group_size=64, act_order=False)
    blocks, cands, bits = _table(shapes, s, lambda i, n: None, get_format("quantkit"))
    numel = sum(o * i for layer in shapes for o, i in layer.values())
    per_weight = [[x / (numel / 6) for x in row] for row in bits]  # the blocks' sizes are near enough equal here
    layers = [{b: [] for b in ("attn", "mlp")} for _ in shapes]
    for (li, b), row, costs in zip(blocks, cands, per_weight, strict=True):
        layers[li][b] = [{"candidate": c.name, "error": 2.0 ** -x} for c, x in zip(row, costs, strict=True)]
    kl = [[[1000.0], [0.01]], [[0.01], [0.01]], [[0.01], [0.01]]]  # layer 0's attention is what the model needs
    meas = {"layers": layers, "probe": {"rows": 4, "tokens": 128, "bits": [2], "kl": kl}}
    uniform3 = sum(row[[c.name for c in r].index("3")] for row, r in zip(bits, cands, strict=True)) / numel
    alloc = allocate(meas, shapes, uniform3, s, lambda i, n: None, "quantkit")
    chosen = bits[0][[c.name for c in cands[0]].index(alloc.choices[0]["attn"])] / (2 * 256 * 256 + 2 * 64 * 256)
    assert uniform3 + 2 < chosen <= uniform3 + 2.5, (alloc.choices[0]["attn"], chosen, uniform3)
    below = [alloc.specs[li][n] for li in (1, 2) for n in layer]
    assert any(sp.group_size == PER_CHANNEL or sp.bits == 2 for sp in below)
    assert alloc.bits <= uniform3 * numel


def test_a_candidates_kl_is_its_blocks_probe_through_the_square_law():
    from quantkit.quant.allocate import predicted_kl

    assert predicted_kl([0.2, 0.1, 0.05], (0.1, 0.4)) == pytest.approx([1.6, 0.4, 0.1])
    assert predicted_kl([0.2, 0.1], None) == [0.2, 0.1] and predicted_kl([0.2], (0.1, 0.0)) == [0.2]


BLOCK_NUMEL = {"attn": 2 * 128 * 128 + 2 * 64 * 128, "mlp": 3 * 128 * 256}  # one layer's, of the tiny model


def test_a_run_measures_the_candidates_its_target_can_use(tiny_models, tmp_path):
    """A --bpw 3.0 run (quantkit format) measures the candidates that store at most 2.5 bits per weight above 3.0
    and probes at 2 bits: its measurement.json serves 3.0 and the targets below it, and a higher target is refused
    (nothing written), naming the target it was made for; so is one that lacks a candidate, even in a dry run."""
    src = tiny_models.get("mistral_bpw")["hf"]
    result = run("quantize", src, tmp_path / "w3", "--bpw", "3.0", *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "reuse it with --measurement for --bpw up to 3" in result.output
    meas = json.loads((tmp_path / ".w3.quantkit-work" / "measurement.json").read_text())
    assert meas["scope"] == "all" and meas["reach"] == 5.5
    assert meas["probe"]["bits"] == [2] and all(len(kl) == 1 for layer in meas["probe"]["kl"] for kl in layer)
    for layer in meas["layers"]:
        for b in ("attn", "mlp"):
            names = {e["candidate"] for e in layer[b]}
            assert {"2", "2 per-channel", "3", "3+salient", "4", "5"} <= names and not {"6", "7+salient", "8"} & names
            assert all(e["bits"] <= 5.5 * BLOCK_NUMEL[b] for e in layer[b])
    kept = tmp_path / "measurement.json"
    kept.write_text(json.dumps(meas))
    result = run("quantize", src, tmp_path / "w25", "--bpw", "2.5", "--measurement", kept, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert 2.48 <= decoder_bpw(tmp_path / "w25") <= 2.5
    result = run("quantize", src, tmp_path / "w4", "--bpw", "4.0", "--measurement", kept, *ARGS)
    assert result.exit_code == 1 and "was made for --bpw up to 3, which lacks candidates --bpw 4" in result.stderr
    assert "measure again" in result.stderr and not (tmp_path / "w4").exists()
    result = run("quantize", src, tmp_path / "g3", "--bpw", "3.0", "--format", "gptq", "--measurement", kept, *ARGS)
    assert result.exit_code == 1 and "was made for --format quantkit, not gptq" in result.stderr
    meas["layers"][0]["attn"] = [e for e in meas["layers"][0]["attn"] if e["candidate"] != "3"]
    kept.write_text(json.dumps(meas))  # a candidate its reach covers is missing: refused before any work
    result = run("quantize", src, tmp_path / "d25", "--bpw", "2.5", "--measurement", kept, "--dry-run", *ARGS)
    assert result.exit_code == 1 and "lacks layer 0 attn candidates (3)" in result.stderr, result.output


def test_measure_for_makes_one_measurement_serve_every_target(tiny_models, tmp_path):
    """--measure-for 9 measures every candidate, so the measurement.json serves any target; one that lacks a
    candidate the target may use is refused, naming it."""
    from quantkit.formats.registry import get_format

    src = tiny_models.get("mistral_bpw")["hf"]
    result = run("quantize", src, tmp_path / "w3", "--bpw", "3.0", "--measure-for", "9", *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    meas = json.loads((tmp_path / ".w3.quantkit-work" / "measurement.json").read_text())
    every = {b: [c.name for c in get_format("quantkit").candidates(b, False)] for b in ("attn", "mlp")}
    for layer in meas["layers"]:
        assert {b: [e["candidate"] for e in layer[b]] for b in ("attn", "mlp")} == every
    kept = tmp_path / "measurement.json"
    kept.write_text(json.dumps(meas))
    result = run("quantize", src, tmp_path / "w5", "--bpw", "5.0", "--measurement", kept, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert 4.98 <= decoder_bpw(tmp_path / "w5") <= 5.0
    for layer in meas["layers"]:
        layer["attn"] = [e for e in layer["attn"] if e["candidate"] != "5"]
    kept.write_text(json.dumps(meas))
    result = run("quantize", src, tmp_path / "w4", "--bpw", "4.0", "--measurement", kept, *ARGS)
    assert result.exit_code == 1 and "lacks layer 0 attn candidates (5)" in result.stderr
    assert "measure again" in result.stderr and not (tmp_path / "w4").exists()
    result = run("quantize", src, tmp_path / "w6", "--bits", "4", "--measure-for", "5", *ARGS)
    assert result.exit_code == 1 and "--measure-for goes with --bpw" in result.stderr
    result = run("quantize", src, tmp_path / "w7", "--bpw", "4.0", "--measurement", kept, "--measure-for", "5", *ARGS)
    assert result.exit_code == 1 and "--measure-for is for a new measurement" in result.stderr
    assert not (tmp_path / "w7").exists()


def test_the_measurement_does_not_depend_on_how_many_settings_a_pass_solves(monkeypatch):
    """measure_layer solves a linear's settings of one grid kind in one pass, as many as SOLVE_BYTES holds for the
    block: with no room beyond SOLVE_CACHE (a large model's case: 4 a pass, and the least recently used evicted) it
    records the same candidates, bits and errors (the stacked solve is row by row; errors to float rounding)."""
    from test_decode import tiny_model

    from quantkit.quant import measure
    from quantkit.quant.capture import LayerIO, MemoryRows
    from quantkit.quant.settings import QuantSettings

    model = tiny_model()
    rows = [torch.randn(1, 64, 64) for _ in range(3)]
    ctx = model.context(0, rows[0])
    s = QuantSettings(group_size=32)
    solved = []
    real_solve = measure._solve
    monkeypatch.setattr(measure, "_solve", lambda *a: solved.append(len(a[3])) or real_solve(*a))

    def measured(room: int) -> dict:
        monkeypatch.setattr(measure, "SOLVE_BYTES", room)
        io = LayerIO(3, MemoryRows(list(rows)), MemoryRows([None] * 3), "cpu", middle=MemoryRows([None] * 3))
        return measure.measure_layer(model.layers[0], io, ctx, s, lambda n: None, "quantkit")

    small = measured(0)
    assert max(solved) == measure.SOLVE_CACHE
    passes_small = len(solved)
    solved.clear()
    big = measured(1 << 30)
    assert max(solved) > measure.SOLVE_CACHE and len(solved) < passes_small
    for block in ("attn", "mlp"):
        assert [(c["candidate"], c["bits"]) for c in small[block]] == [(c["candidate"], c["bits"]) for c in big[block]]
        for a, b in zip(small[block], big[block], strict=True):
            assert a["error"] == pytest.approx(b["error"], rel=1e-4), a["candidate"]
