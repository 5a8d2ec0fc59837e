"""`--export-names gptqmodel` exports carry the module names GPTQModel and transformers 5 use (issue 18; the default
`vllm` naming is checked in tests/test_vllm_names.py), quantkit loads both those and the legacy (vLLM) names,
refuses folders whose quantized tensors would leave layers uninitialized, and writes processor files only for models
with a vision tower.

References: transformers 5's own module names (LlavaForConditionalGeneration's state_dict, Mixtral's fused experts
and its checkpoint conversion mapping). GPTQModel's names are checked by loading in tests/interop (own venv).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from native_models import build_reference, read_safetensors, write_native
from safetensors.torch import save_file

from quantkit.arch import export_name
from quantkit.cli import main
from quantkit.convert.pipeline import convert
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import HF_INDEX
from quantkit.quantized_model import load_quantized
from quantkit.tokenizer.chat import ChatTokenizer

FAST = ["--group-size", "32", "--rows", "4", "--seq-len", "64", "--quiet"]
# current name -> legacy name, written here independently of quantkit's table (for the old-layout copies)
TO_LEGACY = [
    (r"^model\.layers\.(\d+)\.mlp\.gate\.", r"model.layers.\1.block_sparse_moe.gate."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.", r"model.layers.\1.block_sparse_moe.experts.\2.w3."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def to_legacy(name: str, arch: str) -> str:
    if arch == "mistral":
        return name
    for pattern, repl in TO_LEGACY[:4] if arch == "mixtral" else TO_LEGACY[4:]:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a model folder with its tensors passed through edit(dict) -> dict (one shard, no index)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", HF_INDEX))
    save_file(edit(read_safetensors(src)), str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for model, fmt in (("mixtral", "gptq"), ("mixtral", "quantkit"), ("pixtral_12b", "gptq")):
        dst = root / f"{model}-{fmt}"
        result = cli("quantize", tiny_models.get(model)["hf"], dst, "--format", fmt, "--bits", "4", *FAST,
                     "--export-names", "gptqmodel")
        assert result.exit_code == 0, result.output + str(result.exception)
        out[model, fmt] = dst
    return out


def test_llava_export_names_are_transformers_module_names(tiny_models):
    """transformers 5 builds Llava as model.language_model / model.vision_tower / model.multi_modal_projector /
    lm_head; save_pretrained still writes the legacy names, which export_name must map onto exactly those."""
    m = tiny_models.get("pixtral_12b")
    legacy = set(m["hf_tensors"])
    assert any(k.startswith("language_model.model.") for k in legacy)
    assert {export_name("pixtral", k) for k in legacy} == set(m["reference"].state_dict())


def test_mixtral_export_names_follow_transformers_mixtral_layout(tiny_models):
    """Router and non-expert names equal transformers' modules; gate_proj/up_proj/down_proj are w1/w3/w2, the
    order transformers fuses them in (experts.gate_up_proj[e] = [w1; w3], experts.down_proj[e] = w2)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    m = tiny_models.get("mixtral")
    hf, ref = m["hf_tensors"], m["reference"]
    state = ref.state_dict()
    renamed = {export_name("mixtral", k): v for k, v in hf.items()}
    plain = {k for k in renamed if ".experts." not in k}
    assert plain == {k for k in state if ".experts." not in k}
    assert "model.layers.0.mlp.gate.weight" in plain
    fused = [c for c in get_checkpoint_conversion_mapping("mixtral") if "gate_up_proj" in str(c.target_patterns)]
    assert fused[0].source_patterns == [".experts.*.w1.weight", ".experts.*.w3.weight"]
    ffn = ref.config.intermediate_size
    for layer in range(ref.config.num_hidden_layers):
        for e in range(ref.config.num_local_experts):
            p = f"model.layers.{layer}.mlp.experts"
            gate_up, down = state[f"{p}.gate_up_proj"][e], state[f"{p}.down_proj"][e]
            assert torch.equal(renamed[f"{p}.{e}.gate_proj.weight"], gate_up[:ffn])
            assert torch.equal(renamed[f"{p}.{e}.up_proj.weight"], gate_up[ffn:])
            assert torch.equal(renamed[f"{p}.{e}.down_proj.weight"], down)
    assert all(export_name("mistral", k) == k for k in tiny_models.get("mistral_large")["hf_tensors"])


@pytest.mark.parametrize("key", [("mixtral", "gptq"), ("mixtral", "quantkit"), ("pixtral_12b", "gptq")])
def test_exports_use_current_names_and_old_names_still_load(exports, tmp_path, key):
    folder = exports[key]
    arch = "pixtral" if key[0] == "pixtral_12b" else "mixtral"
    names = set(read_safetensors(folder))
    assert all(export_name(arch, k) == k for k in names)  # nothing left under a legacy name
    marker = "qweight" if key[1] == "gptq" else "qmeta"
    if arch == "mixtral":
        assert f"model.layers.1.mlp.experts.3.down_proj.{marker}" in names
        assert "model.layers.0.mlp.gate.weight" in names
    else:
        assert f"model.language_model.layers.1.mlp.down_proj.{marker}" in names
        assert {"lm_head.weight", "model.vision_tower.ln_pre.weight"} <= names
    if key[1] == "quantkit":
        modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
        assert "model.layers.0.mlp.experts.0.gate_proj" in modules
    old = rewrite(folder, tmp_path / "legacy", lambda t: {to_legacy(k, arch): v for k, v in t.items()})
    assert set(read_safetensors(old)) != names
    ids = torch.tensor([[1, 1500, 2900, 4000, 777, 31]])
    with torch.no_grad():
        new_logits = load_quantized(folder, dtype="float32", progress=False)(ids)
        old_logits = load_quantized(old, dtype="float32", progress=False)(ids)
    assert torch.equal(new_logits, old_logits)


def test_card_and_readme_warn_about_the_transformers_mixtral_misload(exports):
    card = (exports["mixtral", "gptq"] / "README.md").read_text()
    assert "Do not load this Mixtral GPTQ folder with transformers" in card
    assert "pip install optimum gptqmodel" in card and "GPTQModel.load" in card
    pixtral = (exports["pixtral_12b", "gptq"] / "README.md").read_text()
    assert "Do not load" not in pixtral and "AutoModelForImageTextToText" in pixtral
    assert "vllm serve DIR`" in pixtral  # 4 bits: no float16 requirement
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "pip install optimum gptqmodel" in readme and "--dtype float16" in readme
    assert "silently" in readme and "Mixtral" in readme


def refused(folder: Path) -> str:
    with pytest.raises(QuantkitError) as err:
        load_quantized(folder, progress=False)
    result = cli("run", folder, "--prompt", "hi", "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return str(err.value)


def test_expert_weights_a_loader_would_drop_are_refused_by_name(exports, tmp_path):
    src = exports["mixtral", "gptq"]
    # a half-renamed layout: experts under `mlp` but with the legacy w1/w2/w3 leaf names
    half = rewrite(src, tmp_path / "half", lambda t: {re.sub(r"\.gate_proj\.", ".w1.", k): v for k, v in t.items()})
    msg = refused(half)
    assert "model.layers.0.mlp.experts.0.w1," in msg and "does not have" in msg
    # one expert's quantized tensors gone: the loader must not build that linear from nothing
    gone = rewrite(src, tmp_path / "gone", lambda t: {k: v for k, v in t.items() if ".experts.2.up_proj." not in k})
    msg = refused(gone)
    assert "neither quantized tensors nor a 16-bit weight" in msg and "model.layers.0.mlp.experts.2.up_proj" in msg
    # one part of a linear gone
    part = rewrite(
        src, tmp_path / "part", lambda t: {k: v for k, v in t.items() if not k.endswith("0.down_proj.qzeros")}
    )
    assert "qzeros are missing" in refused(part)


def test_language_model_weights_under_two_layouts_are_refused_by_name(exports, tmp_path):
    src = exports["pixtral_12b", "gptq"]

    def one_layer_legacy(t):
        return {(to_legacy(k, "pixtral") if ".layers.1." in k else k): v for k, v in t.items()}

    msg = refused(rewrite(src, tmp_path / "mixed", one_layer_legacy))
    assert "model.language_model.layers.0.mlp.down_proj" in msg  # any legacy name: a legacy folder


def test_text_only_conversion_writes_no_processor_files(tmp_path):
    """A text-only Mistral that ships a multimodal tokenizer (v7m1): no processor configs, no images in the
    template, no processor_class; the same tokenizer with a vision tower keeps them (tests/test_tokenizer_files)."""
    native = tmp_path / "native"
    write_native("mistral_large", build_reference("mistral_large"), native)
    (native / "tokenizer.model.v3").unlink()
    (native / "tokenizer.model.v7m1").symlink_to(Path(__import__("mistral_common").__file__).parent / "data" /
                                                 "mistral_instruct_tokenizer_241114.model.v7m1")  # fmt: skip
    convert(native, tmp_path / "hf", progress=False)
    out = tmp_path / "hf"
    files = {p.name for p in out.iterdir()}
    assert "tokenizer.json" in files and not files & {"processor_config.json", "preprocessor_config.json"}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "processor_class" not in config
    assert "set IMAGES = false" in config["chat_template"]
    tok = ChatTokenizer.from_folder(out)
    assert tok.encode_chat([{"role": "user", "content": "hi"}]).input_ids


def test_missing_tensors_are_named_before_any_weight_is_read(tiny_models, tmp_path):
    from quantkit.model.load import load_model

    bad = tmp_path / "bad"
    shutil.copytree(tiny_models.get("mistral_large")["hf"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(QuantkitError, match="tensors missing from the checkpoint: model.layers.2.") as err:
        load_model(bad, progress=False)
    assert "and 6 more" in str(err.value)  # 9 tensors per layer: 2 norms, q/k/v/o, gate/up/down
