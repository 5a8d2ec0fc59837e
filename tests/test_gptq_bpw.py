"""quantize --bpw --format gptq: GPTQ-loadable choices only, bytes on disk at the target, per-module bits in
GPTQModel's `dynamic` field, and quantkit's own loading of the mixed folder."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from quantkit.cli import main
from quantkit.formats.gptq import GPTQ_BITS, dynamic_override, gptq_unpack, module_bits, module_sym
from quantkit.serve.server import bits_label

NUMEL = 8 * (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256)  # the decoder linears of mistral_gptq_bpw's 8 layers
ARGS = ["--format", "gptq", "--group-size", "64", "--rows", "4", "--seq-len", "64", "--measure-rows", "2", "--quiet"]
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def stored(folder) -> dict[str, dict[str, tuple[list[int], int]]]:
    """module -> {part: (shape, bytes)} of every GPTQ tensor on disk."""
    out: dict[str, dict] = defaultdict(dict)
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118
                module, _, part = k.rpartition(".")
                if part in PARTS:
                    t = st.get_slice(k)
                    shape = t.get_shape()
                    size = {"I32": 4, "F16": 2}[t.get_dtype()]
                    out[module][part] = (shape, size * int(torch.tensor(shape).prod()))
    return out


@pytest.fixture(scope="module")
def measured(tiny_models, tmp_path_factory, fresh_bpw_build):
    """A fresh --bpw 3.0 run; its measurement.json is kept for the other targets."""
    src, root = tiny_models.get("mistral_gptq_bpw")["hf"], tmp_path_factory.mktemp("gptqbpw")
    return src, root, fresh_bpw_build(src, root, ARGS)


@pytest.mark.parametrize("target", [2.75, 3.0, 4.0])
def test_bytes_on_disk_hit_the_target_with_loadable_bits(measured, target):
    src, root, measurement = measured
    out = root / f"q{target}"
    result = run("quantize", src, out, "--bpw", target, "--measurement", measurement, *ARGS)
    assert result.exit_code == 0, result.output + str(result.exception)
    tensors = stored(out)
    assert len(tensors) == 8 * 7 and all(set(p) == set(PARTS) for p in tensors.values())
    realized = 8 * sum(size for parts in tensors.values() for _, size in parts.values()) / NUMEL
    assert target - 0.02 <= realized <= target + 1e-9, realized
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["group_size"] == 64 and qcfg["quantkit"]["bpw"] == target
    bits = {}
    for module, parts in tensors.items():
        b = module_bits(qcfg, module)
        (k_rows, out_f), (in_f,) = parts["qweight"][0], parts["g_idx"][0]
        assert b in GPTQ_BITS and k_rows * 32 == in_f * b, module  # the rule's bits are the stored ones
        assert parts["scales"][0] == [in_f // 64, out_f]  # the run's one group size
        bits[module] = b
    for i in range(8):
        layer = f"model.layers.{i}"
        assert len({bits[f"{layer}.self_attn.{p}_proj"] for p in "qkv"}) == 1  # vLLM's qkv_proj
        assert bits[f"{layer}.mlp.gate_proj"] == bits[f"{layer}.mlp.up_proj"]  # vLLM's gate_up_proj
    assert len(set(bits.values())) > 1  # mixed
    assert qcfg["sym"] is True  # GPTQModel refuses a top-level false; every module has its own rule below
    for module, b in bits.items():  # 2/3-bit modules asymmetric, 4/8-bit symmetric, as their rules say
        assert module_sym(qcfg, module) == (b >= 4), module
        assert dynamic_override(qcfg["dynamic"], module)["sym"] == (b >= 4)
    zeros = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for module in (m for m in bits if f"{m}.qzeros" in st.keys()):  # noqa: SIM118
                t = {part: st.get_tensor(f"{module}.{part}") for part in PARTS}
                zeros[module] = gptq_unpack(t, bits[module])[2]
    for module, z in zeros.items():  # a symmetric grid stores the middle code; an asymmetric one its own zeros
        assert bool((z == 2 ** (bits[module] - 1)).all()) == (bits[module] >= 4), module
    assert dynamic_override(qcfg["dynamic"], "lm_head") is False
    assert bits_label(qcfg) == f", per-module {'/'.join(map(str, sorted(set(bits.values()))))}-bit"  # serve's line


def test_mixed_folder_runs_in_quantkit(measured, tmp_path):
    """eval loads per-module bits from `dynamic` (a folder read with one `bits` for all would be refused: qweight
    shapes would not match) and stays close to the float model."""
    src, root, measurement = measured
    out = tmp_path / "mixed"
    assert run("quantize", src, out, "--bpw", 3.5, "--measurement", measurement, *ARGS).exit_code == 0
    result = run("eval", out, "--reference", src, "--rows", "2", "--seq-len", "32", "--json", "--quiet")
    assert result.exit_code == 0, result.output + str(result.exception)
    assert 0 < json.loads(result.stdout)["kl_divergence"] < 5


def test_moe_block_takes_one_width(tiny_models, tmp_path):
    src = tiny_models.get("mixtral")["hf"]
    args = [a if a != "64" else "32" for a in ARGS]
    out = tmp_path / "moe"
    result = run("quantize", src, out, "--bpw", 3.0, *args)
    assert result.exit_code == 0, result.output + str(result.exception)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = stored(out)
    for i in range(2):
        experts = {module_bits(qcfg, m) for m in tensors if m.startswith(f"model.layers.{i}.block_sparse_moe.experts.")}
        assert len(experts) == 1  # w1, w2 and w3 of every expert: one FusedMoE setting in vLLM
        assert module_bits(qcfg, f"model.layers.{i}.block_sparse_moe.experts") == next(iter(experts))  # vLLM's name
        assert module_bits(qcfg, f"model.layers.{i}.mlp.experts.0.gate_proj") == experts.pop()  # GPTQModel's
        for router in (f"model.layers.{i}.block_sparse_moe.gate", f"model.layers.{i}.mlp.gate"):
            assert dynamic_override(qcfg["dynamic"], router) is False
    for m, parts in tensors.items():
        assert parts["qweight"][0][0] * 32 == parts["g_idx"][0][0] * module_bits(qcfg, m)


def test_uniform_pixtral_export_says_what_stays_16_bit(tiny_models, tmp_path):
    src = tiny_models.get("pixtral_large")["hf"]
    out = tmp_path / "pix"
    result = run("quantize", src, out, "--format", "gptq", "--bits", 4, "--group-size", 32, "--rows", 2,
                 "--seq-len", 32, "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output + str(result.exception)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert all(k.startswith("-:") for k in qcfg["dynamic"])
    for name in ("model.vision_tower.transformer.layers.0.attention.q_proj", "vision_tower.transformer.layers.0."
                 "attention.qkv_proj", "model.multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
                 "lm_head", "language_model.lm_head"):  # fmt: skip
        assert dynamic_override(qcfg["dynamic"], name) is False, name
    for module in stored(out):
        assert module_bits(qcfg, module) == 4 and module.startswith("language_model.model.layers."), module
    for name in ("model.language_model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.qkv_proj"):
        assert not any(re.match(k[2:], name) for k in qcfg["dynamic"])
    result = run("eval", out, "--reference", src, "--rows", "2", "--seq-len", "32", "--json", "--quiet")
    assert result.exit_code == 0, result.output + str(result.exception)


def test_grid_symmetry_follows_the_width_unless_set():
    """Unset, 4 and 8 bits are symmetric (what Marlin-class kernels run) and 2 / 3 bits asymmetric; a mixed layout
    follows its narrowest width; --sym / --asym set it for every width."""
    from quantkit.formats.spec import QuantSettings

    auto = QuantSettings()
    assert [auto.sym_for(b) for b in (2, 3, 4, 8)] == [False, False, True, True]
    assert auto.sym_for(((4, 64), (3, 64))) is False and auto.sym_for(((8, 64), (4, 64))) is True
    assert all(QuantSettings(sym=True).sym_for(b) for b in (2, 3, 4, 8))
    assert not any(QuantSettings(sym=False).sym_for(b) for b in (2, 3, 4, 8))
    assert (auto.sym_words(), QuantSettings(sym=False).sym_words()) == ("sym at 4+ bits, asym below", "asym")


def test_uniform_gptq_builds_stay_symmetric_unless_asked():
    """GPTQModel loads a GPTQ folder with a top-level sym false only if it made it: a uniform GPTQ build is
    symmetric unless --asym; --bpw GPTQ builds and quantkit-format builds keep the by-width default."""
    from quantkit.formats.spec import QuantSettings
    from quantkit.quant.settings import QuantizeOptions

    def sym(**kw):
        return QuantizeOptions(settings=QuantSettings(bits=3, sym=kw.pop("sym", None)), device="cpu", **kw).check()

    assert sym(fmt="gptq").settings.sym is True
    assert sym(fmt="gptq", sym=False).settings.sym is False
    assert sym(fmt="gptq", bpw=3.0).settings.sym is None
    assert sym(fmt="quantkit").settings.sym is None
