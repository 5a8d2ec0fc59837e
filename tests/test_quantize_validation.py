"""quantize refuses bad arguments before any work: one `error:` line, exit 1, nothing at DST and no work dir
(issue 19's cases: --bpw NaN/inf/out of the cost model's range, devices, --damp, --measure-rows, --max-shard-size,
an already-quantized source, a measurement of fewer layers), and the --bpw dry run says what it would do."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from quantkit.cli import main

FAST = ["--rows", "2", "--seq-len", "16", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def src(tiny_models):
    return tiny_models.get("mistral_large")["hf"]


def refused(result, needle: str, dst) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not dst.exists() and not (dst.parent / f".{dst.name}.quantkit-work").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bpw", "nan"], "--bpw must be a positive number"),
        (["--bpw", "inf"], "--bpw must be a positive number"),
        (["--bpw", "-1"], "--bpw must be a positive number"),
        (["--bpw", "0"], "--bpw must be a positive number"),
        (["--bpw", "1.0"], "--bpw 1.0 is outside what this model can reach"),
        (["--bpw", "100"], "--bpw 100.0 is outside what this model can reach"),
        (["--bpw", "3", "--measure-rows", "0"], "--measure-rows must be at least 1"),
        (["--bpw", "3", "--static-groups"], "drop --static-groups"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "tpu:7"], "device"),
        (["--damp", "-1"], "--damp must be a fraction"),
        (["--damp", "nan"], "--damp must be a fraction"),
        (["--max-shard-size", "huge"], "cannot parse size"),
        (["--max-shard-size", "0"], "--max-shard-size must be positive"),
        (["--rows", "0"], "--rows must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(src, tmp_path, args, needle):
    dst = tmp_path / "out"
    refused(run("quantize", src, dst, "--group-size", "32", *FAST, *args), needle, dst)


def test_already_quantized_source_is_refused(src, tmp_path):
    quantized = tmp_path / "q"
    shutil.copytree(src, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    refused(run("quantize", quantized, dst, "--group-size", "32", *FAST), "already quantized (gptq)", dst)


def test_measurement_of_fewer_layers_is_refused(src, tmp_path):
    cut = tmp_path / "measurement.json"
    cut.write_text(json.dumps({"version": 1, "fingerprint": {}, "layers": [{"attn": [], "mlp": []}]}))
    dst = tmp_path / "out"
    result = run("quantize", src, dst, "--bpw", "4", "--group-size", "32", "--measurement", cut, *FAST)
    refused(result, "covers 1 layers, the model has 2", dst)


def test_bpw_dry_run_reports_range_format_and_calibration(src, tmp_path):
    dst = tmp_path / "out"
    result = run("quantize", src, dst, "--bpw", "4", "--group-size", "32", "--dry-run", *FAST)
    assert result.exit_code == 0, result.output
    assert "format: quantkit; --bpw 4.0 (this model reaches " in result.output
    assert "calibration: 2 rows x 16 tokens from the bundled mix" in result.output
    assert not dst.exists()


def test_dry_run_size_is_the_written_size(src, tmp_path):
    """The plan sizes packed linears with the cost model, so its output size is what the run writes (within the
    safetensors headers and the kept tensors' rounding)."""
    from dataclasses import replace

    from quantkit.quant.pipeline import quantize
    from quantkit.quant.settings import QuantizeOptions, QuantSettings

    dst = tmp_path / "out"
    o = QuantizeOptions(QuantSettings(4, 32), rows=2, seq_len=16)
    planned = quantize(src, dst, replace(o, dry_run=True), progress=False, log=lambda m: None).output_bytes
    quantize(src, dst, o, progress=False, log=lambda m: None)
    written = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    assert abs(planned - written) < 0.002 * written, (planned, written)


def test_quantize_device_defaults_to_auto():
    from quantkit.commands.quantize import quantize
    from quantkit.quant.settings import resolve_device

    device = next(p for p in quantize.params if p.name == "device")
    assert device.default == "auto"
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
