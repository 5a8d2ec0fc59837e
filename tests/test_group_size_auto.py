"""--group-size auto (the default): 128 where it divides every quantized width, else 64 / 32, else per channel;
resolved before any work, said in the log, the dry run and the model card, and recorded as the concrete number (so
auto -> 128 writes the same bytes as --group-size 128). A model 128 does not divide (SmolLM2-135M: 576) must work."""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common
import pytest
from click.testing import CliRunner
from same_output import assert_same_files

from quantkit.arch.blocks import BLOCK_ROLES
from quantkit.cli import main
from quantkit.formats.registry import get_format
from quantkit.formats.spec import Candidate
from quantkit.quant.measure import PER_CHANNEL, spec_for_candidate
from quantkit.quant.settings import QuantSettings, resolve_group_size

FAST = ["--rows", "2", "--seq-len", "16", "--quiet"]
WHY = "128 does not divide self_attn.q_proj's 192 input features"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def wide192(tmp_path_factory) -> Path:
    """A converted one-layer model of width 192 (3 x 64, like SmolLM2's 576 = 9 x 64): 64 divides it, 128 does not."""
    from quantkit.convert.pipeline import convert
    from quantkit.synthetic import write_synthetic_native

    root = tmp_path_factory.mktemp("wide192")
    tok = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    params = dict(dim=192, hidden_dim=384, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=64, vocab_size=32768,
                  rope_theta=1e6, norm_eps=1e-5)  # fmt: skip
    write_synthetic_native(root / "native", params, tokenizer_file=tok)
    convert(root / "native", root / "hf", progress=False)
    return root / "hf"


def test_resolve_group_size():
    assert resolve_group_size({"a": (8, 256), "b": (8, 512)}) == (128, "")
    assert resolve_group_size({"a": (8, 256), "b": (8, 576)}) == (64, "128 does not divide b's 576 input features")
    assert resolve_group_size({"a": (8, 96)}) == (32, "64 does not divide a's 96 input features")
    assert resolve_group_size({"a": (8, 64), "b": (8, 48)}) == (None, "32 does not divide b's 48 input features")


def test_default_quantize_resolves_to_64_and_says_so(wide192, tmp_path, one_thread):
    dry = run("quantize", wide192, tmp_path / "dry", "--dry-run", *FAST)
    assert dry.exit_code == 0, dry.output
    assert f"group size: auto -> 64 ({WHY})" in dry.output and ", group 64," in dry.output
    dst = tmp_path / "out"
    result = run("quantize", wide192, dst, *FAST)
    assert result.exit_code == 0, result.output + str(result.exception)
    assert f"group size: auto -> 64 ({WHY})" in result.output
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert f"| Group size | 64 (auto: {WHY}) |" in (dst / "README.md").read_text()


def test_explicit_size_that_does_not_divide_is_refused(wide192, tmp_path):
    dst = tmp_path / "out"
    result = run("quantize", wide192, dst, "--group-size", "128", *FAST)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"error: --group-size {WHY}"]
    assert not dst.exists() and not (tmp_path / ".out.quantkit-work").exists()


def test_auto_writes_the_same_bytes_as_128(tiny_models, tmp_path, one_thread):
    src = tiny_models.get("mistral_bpw")["hf"]  # widths 128 and 256
    for name, args in (("auto", []), ("g128", ["--group-size", "128"])):  # one DST name: the card's title
        (tmp_path / name).mkdir()
        result = run("quantize", src, tmp_path / name / "out", *args, *FAST)
        assert result.exit_code == 0, result.output + str(result.exception)
    assert "group size: auto -> 128" in run("quantize", src, tmp_path / "dry", "--dry-run", *FAST).output
    assert_same_files(tmp_path / "g128" / "out", tmp_path / "auto" / "out")


def test_auto_counts_the_vision_tower_and_falls_back_to_per_channel(tiny_models, tmp_path):
    src = tiny_models.get("pixtral_large")["hf"]  # text 64 wide; vision 176 = 5.5 x 32
    args = ["--format", "quantkit", "--dry-run", *FAST]
    assert "group size: auto -> 64 (128 does not divide" in run("quantize", src, tmp_path / "a", *args).output
    said = run("quantize", src, tmp_path / "b", "--vision", "quantize", *args).output
    assert "group size: auto -> none, per channel (32 does not divide vision " in said, said
    assert ", group none," in said


def test_bpw_candidates_use_the_resolved_size(wide192, tmp_path):
    """--bpw's table: the run's-size candidates take auto's 64; a fixed g32 (a candidate a format may declare) that
    does not divide takes the run's."""
    for g, k in ((64, 192), (64, 384), (None, 48)):
        s = QuantSettings(group_size=g)
        for block in ("attn", "mlp"):
            g32 = Candidate("3 g32", tuple((r, ((3, 1.0),), 32) for r in BLOCK_ROLES[block]))
            for cand in [*get_format("quantkit").candidates(block, False), g32]:
                for _, _, cand_g in cand.roles:
                    name = "self_attn.q_proj" if block == "attn" else "mlp.down_proj"
                    group = spec_for_candidate(cand, name, k, s, None).group_size
                    assert group is None or k % group == 0, (cand.name, k, group)
                    assert group == (None if cand_g == PER_CHANNEL else g if cand_g is None or k % cand_g else cand_g)
    ranges = [run("quantize", wide192, tmp_path / "x", "--bpw", "3", "--dry-run", *gs, *FAST).output.splitlines()[0]
              for gs in ([], ["--group-size", "64"])]  # fmt: skip
    assert ranges[0] == ranges[1] and ", group 64," in ranges[0], ranges
