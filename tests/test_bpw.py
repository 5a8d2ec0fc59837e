"""quantize --bpw: realized bits per weight, determinism, measurement reuse, and refused targets/measurements.

The tiny model's k/v projections are 64 rows wide, where act order's int32 permutation alone costs half a bit per
weight; the tests use --no-act-order so that 2.5 bpw is reachable.
"""

from __future__ import annotations

import json

import pytest
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
    """A fresh --bpw 3.0 run; its measurement.json is kept for the other targets."""
    src, root = tiny_models.get("mistral_bpw")["hf"], tmp_path_factory.mktemp("bpw")
    return src, root, fresh_bpw_build(src, root, ARGS)


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
    """--bpw 3.0 reads the 2-bit probes: a measurement that holds only 3-bit ones is refused, naming the width."""
    from quantkit.errors import QuantkitError
    from quantkit.model.load import Checkpoint, build_model
    from quantkit.quant.allocate import allocate
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.plan import linear_shapes

    src, _, measurement = measured
    model = build_model(Checkpoint(src).config)
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    meas = json.loads(measurement.read_text())
    k = meas["probe"]["bits"].index(3)
    kls = [[kl[k : k + 1] for kl in layer] for layer in meas["probe"]["kl"]]
    meas["probe"] = {**meas["probe"], "bits": [3], "kl": kls}
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


def test_every_block_stays_between_the_widest_uniform_width_that_fits_and_the_next():
    """The window: with uniform 3-bit within the budget and uniform 4-bit not, every candidate outside 3..4 bits (a
    2-bit or 8-bit role, a per-channel grid) is out; without a uniform build that fits there is no window."""
    from quantkit.quant.allocate import _inside, _window
    from quantkit.quant.measure import PER_CHANNEL, Candidate

    def cand(*roles):
        return Candidate("c", tuple((r, ((w, 1.0),), g) for r, (w, g) in zip(("q", "o"), roles, strict=True)))

    row = [cand((w, None), (w, None)) for w in (2, 3, 4, 8)] + [
        cand((3, None), (8, None)),
        cand((4, PER_CHANNEL), (4, None)),
    ]
    bits = [[200, 300, 400, 800, 550, 390]] * 2
    assert _window([row, row], bits, 700) == (3, 4)
    assert [_inside(c, (3, 4)) for c in row] == [False, True, True, False, False, False]
    assert _window([row, row], bits, 1600) == (8, 8) and _window([row, row], bits, 399) is None
    assert all(_inside(c, None) for c in row)


def test_a_target_reads_the_probe_at_its_lower_width():
    """A target reads one probe, at the widest PROBE_BITS width at or below its window's lower width (the narrowest
    without a window), and predicts a candidate's KL from it with the square law of its local error."""
    from quantkit.quant.allocate import predicted_kl, probe_widths

    assert probe_widths((2, 3)) == (2,) and probe_widths((3, 4)) == (3,)
    assert probe_widths((4, 8)) == (4,) and probe_widths((8, 8)) == (4,) and probe_widths(None) == (2,)
    assert predicted_kl([0.2, 0.1, 0.05], (0.1, 0.4)) == pytest.approx([1.6, 0.4, 0.1])
    assert predicted_kl([0.2, 0.1], None) == [0.2, 0.1] and predicted_kl([0.2], (0.1, 0.0)) == [0.2]


def test_a_plain_run_measures_only_what_its_target_can_choose(tiny_models, tmp_path):
    """Without --measure-all, the measurement holds the candidates inside the target's width window and probes its
    lower width only (allocate.needed_candidates: 2 and 3 bits for 3.0, not 4; probes at 2), the build still hits the
    target, and a target with another window refuses to reuse that measurement (naming what it lacks) while the same
    target takes it."""
    from quantkit.formats.registry import get_format
    from quantkit.model.load import Checkpoint, build_model
    from quantkit.quant.allocate import needed_candidates
    from quantkit.quant.capture import QuantSettings
    from quantkit.quant.plan import linear_shapes

    src = tiny_models.get("mistral_bpw")["hf"]
    out = tmp_path / "w3"
    result = run("quantize", src, out, "--bpw", "3.0", *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert 2.98 <= decoder_bpw(out) <= 3.0
    meas = json.loads((tmp_path / ".w3.quantkit-work" / "measurement.json").read_text())
    assert meas["scope"] == "--bpw 3.0"
    model = build_model(Checkpoint(src).config)
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    s = QuantSettings(bits=4, group_size=64, act_order=False)
    needed = needed_candidates(shapes, 3.0, s, lambda i, n: None, "quantkit")
    every = {b: [c.name for c in get_format("quantkit").candidates(b, False)] for b in ("attn", "mlp")}
    for layer, want in zip(meas["layers"], needed, strict=True):
        for b in ("attn", "mlp"):
            assert [e["candidate"] for e in layer[b]] == want[b]
            assert {"2", "3"} <= set(want[b]) and "4" not in want[b] and len(want[b]) < len(every[b]) / 2
    assert meas["probe"]["bits"] == [2] and all(len(kl) == 1 for layer in meas["probe"]["kl"] for kl in layer)
    kept = tmp_path / "measurement.json"
    kept.write_bytes((tmp_path / ".w3.quantkit-work" / "measurement.json").read_bytes())
    result = run("quantize", src, tmp_path / "w5", "--bpw", "5.0", "--measurement", kept, *ARGS)
    assert result.exit_code == 1 and "lacks attn candidates this target can choose" in result.stderr
    assert "--measure-all" in result.stderr and not (tmp_path / "w5").exists()
    result = run("quantize", src, tmp_path / "again", "--bpw", "3.0", "--measurement", kept, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
