"""Rough edges a new user hit trying every README command (issue 16), one test each."""

from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors import safe_open

from quantkit.cli import main
from quantkit.convert.pipeline import convert


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_convert_dry_run_refuses_what_the_real_run_refuses(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["native"]
    inside = run("convert", src, src / "out", "--dry-run")
    assert inside.exit_code == 1 and "inside the source folder" in inside.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    nonempty = run("convert", src, full, "--dry-run")
    assert nonempty.exit_code == 1 and "is not empty" in nonempty.stderr
    assert run("convert", src, tmp_path / "fresh", "--dry-run").exit_code == 0
    assert not (tmp_path / "fresh").exists() and not (src / "out").exists()


def test_quantize_dry_run_refuses_a_non_empty_dst(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    result = run("quantize", src, full, "--group-size", "32", "--dry-run")
    assert result.exit_code == 1 and "is not empty" in result.stderr


def test_projector_bias_zeros_dry_run_counts_the_zero_parameters(tiny_models, tmp_path):
    """Pixtral-Large has no projector biases: zeros adds 2 tensors, and their parameters, to what is written."""
    src = tiny_models.get("pixtral_large")["native"]
    auto = convert(src, tmp_path / "a", dry_run=True, progress=False)
    zeros = convert(src, tmp_path / "z", projector_bias="zeros", dry_run=True, progress=False)
    assert len(zeros.specs) == len(auto.specs) + 2
    added = zeros.part_params["projector"] - auto.part_params["projector"]
    assert added == 2 * zeros.config["text_config"]["hidden_size"]
    convert(src, tmp_path / "z", projector_bias="zeros", progress=False)
    written = 0
    for f in (tmp_path / "z").glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                written += _numel(sf.get_slice(name).get_shape())
    assert written == sum(zeros.part_params.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_gptq_quantize_prints_the_per_layer_bpw_inspect_reports(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    out = tmp_path / "q"
    result = run("quantize", src, out, "--bits", "4", "--group-size", "32", "--rows", "2", "--seq-len", "16",
                 "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = [line.split(": ")[1].split(" bits")[0] for line in result.output.splitlines() if line.startswith("layer")]
    report = json.loads(run("inspect", out, "--json").output)["quantized"]
    assert printed == [f"{b:.2f}" for b in report["layer_bpw"].values()]


def test_quantize_says_when_calibration_repeats_the_data(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    data = tmp_path / "small.txt"
    data.write_text("A short calibration text.\n\nAnother one.\n")
    args = ["quantize", src, tmp_path / "q", "--bits", "4", "--group-size", "32", "--rows", "4", "--seq-len", "32",
            "--dataset", data, "--quiet", "--dry-run"]  # fmt: skip
    assert "repeat" not in run(*args).output  # the dry run reads no data
    result = run(*args[:-1])
    assert result.exit_code == 0, result.output
    note = [line for line in result.output.splitlines() if line.startswith("calibration:")]
    assert len(note) == 1 and "tokens repeat" in note[0] and "passes" in note[0]


def test_chat_commands_confirm_refuse_and_survive_ctrl_c(tiny_models, tmp_path, scene_image, monkeypatch):
    """/help, /reset and /image confirm; an unknown /command is refused, not sent; Ctrl-C stops one answer only."""
    import quantkit.commands.chat as chat_mod

    asked: list[list[dict]] = []

    def fake_answer(model, tokenizer, encoded, sampling, as_json):
        asked.append(encoded)
        if len(asked) == 1:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the first answer
        return "ok"

    monkeypatch.setattr(chat_mod, "answer", fake_answer)
    folder = tiny_models.get("pixtral_12b")["hf"]
    stdin = f"/help\n/bogus stuff\nfirst\n/image {scene_image}\n/reset\nsecond\n/exit\n"
    result = run("run", folder, "--device", "cpu", "--quiet", input=stdin)
    assert result.exit_code == 0, result.output + str(result.exception)
    err = result.stderr
    assert err.count("/image PATH") == 2  # the banner and /help
    assert "unknown command /bogus" in err
    assert "[answer stopped" in err
    assert f"attached {scene_image}" in err and "conversation cleared" in err
    assert len(asked) == 2  # "first" (stopped) and "second": /bogus never reached the model


def test_demo_script_says_its_weights_are_random_and_what_to_try_next():
    from pathlib import Path

    demo = (Path(__file__).parent.parent / "scripts" / "demo.sh").read_text()
    assert "RANDOM weights" in demo and "outputs are in" in demo and "Try next:" in demo
    assert "--progress-bar on" in demo and " -q " not in demo  # installs show progress


def test_readme_measurement_example_is_where_the_measurement_lands():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "--measurement .pixtral-large-3.0bpw.quantkit-work/measurement.json" in readme
    for item in ("--card --json", "--save", "--json", "--vision quantize", "/reset", "/help", "--dry-run"):
        assert item in readme, item
