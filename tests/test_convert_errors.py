"""Bad input to `quantkit convert` and `inspect`: one-line error, non-zero exit, nothing left at DST."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main


@pytest.fixture
def src(tiny_models, tmp_path):
    """A private copy of the tiny Mistral-Large-like native checkpoint, safe to damage."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_models.get("mistral_large")["native"], folder, symlinks=False)
    return folder


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, needle: str, dst):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]


def rewrite(folder, change):
    path = folder / "consolidated.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_params(src, tmp_path):
    (src / "params.json").unlink()
    assert_error(run("convert", src, tmp_path / "dst"), "no params.json", tmp_path / "dst")


def test_no_safetensors(src, tmp_path):
    (src / "consolidated.safetensors").unlink()
    assert_error(run("convert", src, tmp_path / "dst"), "no consolidated*.safetensors", tmp_path / "dst")


def test_truncated_safetensors(src, tmp_path):
    path = src / "consolidated.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_error(run("convert", src, tmp_path / "dst"), "truncated", tmp_path / "dst")


def test_corrupt_header(src, tmp_path):
    path = src / "consolidated.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))
    assert_error(run("convert", src, tmp_path / "dst"), "corrupt", tmp_path / "dst")


def test_unknown_tensor(src, tmp_path):
    rewrite(src, lambda t: t.update({"layers.0.attention.extra.weight": torch.zeros(2, 2)}))
    assert_error(
        run("convert", src, tmp_path / "dst"), "1 unknown tensor(s): layers.0.attention.extra", tmp_path / "dst"
    )


def test_missing_tensor(src, tmp_path):
    rewrite(src, lambda t: t.pop("layers.1.feed_forward.w3.weight"))
    assert_error(run("convert", src, tmp_path / "dst"), "missing tensor(s): layers.1.feed_forward.w3", tmp_path / "dst")


def test_shape_disagrees_with_params(src, tmp_path):
    rewrite(src, lambda t: t.update({"layers.0.attention.wk.weight": t["layers.0.attention.wk.weight"][:16]}))
    assert_error(run("convert", src, tmp_path / "dst"), "layers.0.attention.wk.weight [16, 64]", tmp_path / "dst")


def test_dst_not_empty(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    result = run("convert", src, dst)
    assert result.exit_code == 1 and "not empty (use --force" in result.stderr
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    forced = run("convert", src, dst, "--force", "--quiet")  # --force replaces only a previous model output
    assert forced.exit_code == 1 and "does not hold a previous model output" in forced.stderr
    assert (dst / "keep.txt").read_text() == "precious"
    (dst / "keep.txt").unlink()
    assert run("convert", src, dst, "--quiet").exit_code == 0
    assert run("convert", src, dst, "--force", "--quiet").exit_code == 0
    assert (dst / "config.json").is_file()


def test_dst_inside_src(src):
    assert_error(run("convert", src, src / "out"), "inside the source", src / "out")


def test_wrong_tokenizer_for_weights(tiny_models, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(tiny_models.get("pixtral_large")["native"], folder, symlinks=False)
    shutil.copy(tiny_models.get("pixtral_12b")["native"] / "tekken.json", folder / "tekken.json")
    (folder / "tokenizer.model.v7m1").unlink()
    assert_error(run("convert", folder, tmp_path / "dst"), "does not belong to these weights", tmp_path / "dst")


def test_adapter_bias_disagrees_with_params(tiny_models, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(tiny_models.get("pixtral_12b")["native"], folder, symlinks=False)
    params = json.loads((folder / "params.json").read_text())
    params["vision_encoder"]["adapter_bias"] = False
    (folder / "params.json").write_text(json.dumps(params))
    assert_error(run("convert", folder, tmp_path / "dst"), "adapter_bias=False", tmp_path / "dst")


def test_dry_run_and_inspect(src, tmp_path):
    result = run("convert", src, tmp_path / "dst", "--dry-run")
    assert result.exit_code == 0 and "architecture: mistral -> MistralForCausalLM" in result.output
    assert not (tmp_path / "dst").exists()
    assert run("convert", src, tmp_path / "dst", "--quiet").exit_code == 0
    native = json.loads(run("inspect", src, "--json").output)
    hf = json.loads(run("inspect", tmp_path / "dst", "--json").output)
    assert native["format"] == "native" and hf["format"] == "hf"
    assert hf["architecture"] == "MistralForCausalLM" and hf["layers"] == 2
    n = sum(t.numel() for t in load_file(src / "consolidated.safetensors").values())
    assert native["total_parameters"] == hf["total_parameters"] == n
    assert hf["dtype"] == "F32" and hf["size_bytes"] > 4 * n


def test_inspect_bad_folder(tmp_path):
    assert_error(run("inspect", tmp_path / "nothing"), "is not a folder", tmp_path / "nothing")


@pytest.mark.parametrize("size", ["0", "0GB", "0.0001B"])
def test_zero_max_shard_size_is_refused_as_quantize_refuses_it(src, tmp_path, size):
    """0 once planned one tensor per shard; convert now refuses it with quantize's message, dry run or not."""
    for extra in ([], ["--dry-run"]):
        result = run("convert", src, tmp_path / "dst", "--max-shard-size", size, *extra)
        assert_error(result, f"--max-shard-size must be positive, got '{size}'", tmp_path / "dst")
