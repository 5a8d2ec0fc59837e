"""GPTQ exports load by name in vLLM: vLLM's weight-name mapping, transcribed below as data, is replayed over every
tensor name of tiny Mistral, Mixtral and Pixtral-12B exports, plain (--bits 4) and mixed (--bpw 3.0), under both
--export-names. Every tensor must land in a parameter of the module tree vLLM builds from the folder's config.json
(each module's GPTQ method decided as vLLM decides it from `dynamic` and the folder's quantized tensors), every such
parameter must get its tensors (every shard of a fused one), and none is left over.

Transcribed from vLLM 0.34.0 (the PyPI wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl), vllm/model_executor/:
- models/registry.py: MistralForCausalLM -> models/mistral.py (LlamaForCausalLM / LlamaModel of models/llama.py: layers
  `self_attn.qkv_proj`, `self_attn.o_proj`, `mlp.gate_up_proj`, `mlp.down_proj`); MixtralForCausalLM -> mixtral.py;
  LlavaForConditionalGeneration -> llava.py (text model: text_config's MistralForCausalLM under `language_model`;
  Pixtral's vision tower: pixtral.py PixtralHFVisionModel; projector: LlavaMultiModalProjector linear_1 / linear_2);
- models/utils.py WeightsMapper._map_name_with_shard (substr, then stacked, then prefix, then suffix rules; a rule
  to None drops the tensor) and AutoWeightsLoader (walks the name down the module tree; a module with its own
  load_weights gets the rest of the name; REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER; it adds the quantization config's
  mapper, base_config.py get_checkpoint_weight_mapper: `.g_idx` -> None, when the module it loads or one of its
  direct children holds `quant_config`: MistralForCausalLM's `model`, MixtralForCausalLM itself, not Llava's top);
- llama.py LlamaModel.hf_to_vllm_mapper, mixtral.py MixtralModel.hf_to_vllm_mapper, llava.py
  LlavaForConditionalGeneration.hf_to_vllm_mapper, pixtral.py PixtralHFVisionModel.load_weights stacked_params_mapping;
- mixtral.py MixtralMoE: `block_sparse_moe.gate` (GateLinear, never quantized) and `block_sparse_moe.experts`
  (FusedMoEFactory(ckpt_names=("w1", "w2", "w3")) -> a MoERunner holding `routed_experts`); fused_moe/routed_experts.py
  build_expert_params_mapping: `experts.E.w1.` / `experts.E.w3.` -> `experts.w13_`, `experts.E.w2.` -> `experts.w2_`;
- layers/quantization/auto_gptq.py: AutoGPTQLinearMethod registers qweight / scales / qzeros, AutoGPTQMoEMethod
  w13_/w2_ qweight / scales / qzeros and zero-initialized w13_bias / w2_bias (a checkpoint need not carry them);
  unquantized: weight (UnquantizedLinearMethod / UnquantizedEmbeddingMethod), w13_weight / w2_weight
  (UnquantizedFusedMoEMethod); utils/gptq_utils.py get_linear_quant_method / get_moe_quant_method: a "-:" rule, or a
  module none of whose checkpoint modules has integer tensors (maybe_update_config's modules_in_block_to_quantize,
  renamed by the model's hf_to_vllm_mapper without stacking, matched as substrings), is unquantized.
Names only: vLLM 0.34's kernels also refuse GPTQ desc_act=True with groups and 2/3-bit widths (auto_gptq.py
TYPE_MAP, gptq_utils.py normalize_and_validate_gptq_desc_act), which this test does not model.
SGLang 0.5.23 (sglang/srt/models/llava.py LlavaForConditionalGeneration.load_weights) routes a Llava tensor by its
`language_model.` / `vision_tower.` prefix, else looks it up among its own parameters (`multi_modal_projector.*`);
its mixtral.py maps experts with ckpt names "w1" / "w2" / "w3" as vLLM does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from native_models import read_safetensors
from safetensors import safe_open

from quantkit.arch import export_name
from quantkit.cli import main

VLLM_VERSION = "0.34.0"
ARGS = ["--format", "gptq", "--rows", "4", "--seq-len", "128", "--quiet"]
BUILDS = {"b4": ["--bits", "4"], "bpw3": ["--bpw", "3.0"]}
ARCH = {"mistral_large": "mistral", "mixtral": "mixtral", "pixtral_12b": "pixtral"}

# models/utils.py AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER (orig_to_new_substr -> None)
ROTARY = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# layers/quantization/base_config.py QuantizationConfig.get_checkpoint_weight_mapper (orig_to_new_suffix -> None)
QUANT_SUFFIX = {".g_idx": None}
# models/llama.py LlamaModel.hf_to_vllm_mapper (orig_to_new_stacked: weight_name -> (param_name, shard_id))
LLAMA_STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
                 ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}  # fmt: skip
# models/mixtral.py MixtralModel.hf_to_vllm_mapper
MIXTRAL_STACKED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v")}
MIXTRAL_SUBSTR = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
# models/mixtral.py MixtralMoE FusedMoEFactory ckpt_names (gate, down, up) -> routed_experts.py shard ids w1, w2, w3
MIXTRAL_EXPERTS = {"w1": ("w13_", "w1"), "w2": ("w2_", "w2"), "w3": ("w13_", "w3")}
# models/llava.py LlavaForConditionalGeneration.hf_to_vllm_mapper (orig_to_new_prefix)
LLAVA_PREFIX = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
# models/pixtral.py PixtralHFVisionModel.load_weights stacked_params_mapping (param_name, shard_name, shard_id)
PIXTRAL_STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
                   (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]  # fmt: skip
# quantization/auto_gptq.py: parameters per quantized / 16-bit module
GPTQ_LINEAR, GPTQ_MOE = ("qweight", "scales", "qzeros"), ("qweight", "scales", "qzeros")
MOE_ZERO_INIT = ("w13_bias", "w2_bias")
# sglang/srt/models/llava.py LlavaForConditionalGeneration.load_weights: routed prefixes, else its own parameters
SGLANG_LLAVA = ("language_model.", "vision_tower.", "multi_modal_projector.")


def apply_mapper(name: str, substr=None, stacked=None, prefix=None, suffix=None) -> tuple[str | None, object]:
    """WeightsMapper._map_name_with_shard: (mapped name or None when dropped, shard id)."""
    shard = None
    for old, new in (substr or {}).items():
        if old in name:
            if new is None:
                return None, None
            name = name.replace(old, new, 1)
    for old, (new, shard_id) in (stacked or {}).items():
        if old in name:
            name, shard = name.replace(old, new, 1), shard_id
    for old, new in (prefix or {}).items():
        if name.startswith(old):
            if new is None:
                return None, None
            name = name.replace(old, new, 1)
    for old, new in (suffix or {}).items():
        if name.endswith(old):
            if new is None:
                return None, None
            name = new.join(name.rsplit(old, 1))
    return name, shard


def rotary(name: str) -> bool:
    return any(r in name for r in ROTARY)


def load_text(name: str, arch: str) -> tuple[str | None, object]:
    """A name under MistralForCausalLM / MixtralForCausalLM -> (vLLM parameter or None if dropped, shard)."""
    if rotary(name):
        return None, None
    name, _ = apply_mapper(name, suffix=QUANT_SUFFIX)  # the top loader finds the quantization config
    if name is None or not name.startswith("model."):
        return name, None  # lm_head.*: a parameter of ParallelLMHead
    rest = name.removeprefix("model.")  # LlamaModel / MixtralModel.load_weights, with their mapper
    if arch == "mixtral":
        rest, shard = apply_mapper(rest, substr=MIXTRAL_SUBSTR, stacked=MIXTRAL_STACKED, suffix=QUANT_SUFFIX)
    else:
        rest, shard = apply_mapper(rest, stacked=LLAMA_STACKED, suffix=QUANT_SUFFIX)
    if rest is None:
        return None, None
    m = re.match(r"(layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.(.+)$", rest)
    if arch == "mixtral" and m:  # the experts module's own load_weights (RoutedExperts, under the MoERunner)
        layer, expert, ckpt, part = m.groups()
        param, shard_id = MIXTRAL_EXPERTS[ckpt]
        return f"model.{layer}.routed_experts.{param}{part}", (int(expert), shard_id)
    return "model." + rest, shard


def load_vision(name: str) -> tuple[str, object]:
    """A name under PixtralHFVisionModel.load_weights (no quantization mapper: g_idx would reach params_dict)."""
    for param, shard_name, shard_id in PIXTRAL_STACKED:
        if shard_name in name:
            return name.replace(shard_name, param), shard_id
    return name, None


def vllm_load(arch: str, name: str) -> tuple[str | None, object]:
    """A checkpoint tensor name -> (the vLLM parameter it loads into or None if vLLM drops it, shard id)."""
    if arch != "pixtral":
        return load_text(name, arch)
    if rotary(name):
        return None, None
    name, _ = apply_mapper(name, prefix=LLAVA_PREFIX)  # no quantization config at Llava's top level
    for child in ("language_model.", "vision_tower."):
        if name.startswith(child):
            loaded = load_text if child == "language_model." else lambda n, _: load_vision(n)
            param, shard = loaded(name.removeprefix(child), "mistral")
            return (child + param if param else None), shard
    return name, None  # multi_modal_projector.* and anything else: a parameter of Llava itself, or none


def dynamic_skip(qcfg: dict, module: str) -> bool:
    """gptq_utils.py get_dynamic_override(config, layer_name=module) == False: the first matching rule is "-:"."""
    for pattern in qcfg.get("dynamic", {}):
        if re.match(pattern[2:] if pattern[:2] in ("-:", "+:") else pattern, module):
            return pattern.startswith("-:")
    return False


def vllm_parameters(cfg: dict, tensors: dict[str, torch.dtype]) -> dict[str, int]:
    """vLLM's parameters for a folder (config.json, tensor dtypes) -> how many checkpoint tensors each takes."""
    qcfg = cfg["quantization_config"]
    arch = {"llava": "pixtral"}.get(cfg["model_type"], cfg["model_type"])
    rename = LLAVA_PREFIX if arch == "pixtral" else {}  # the rename part of the model's hf_to_vllm_mapper
    quantized_modules = {apply_mapper(k.rpartition(".")[0], prefix=rename)[0] for k, dt in tensors.items()
                         if not dt.is_floating_point}  # fmt: skip
    params: dict[str, int] = {}

    def linear(module: str, shards: dict[str, object], bias: bool = False, head: bool = False) -> None:
        leaf = module.rpartition(".")[2]
        found = {any(q in module.replace(leaf, s) for q in quantized_modules) for s in shards or {leaf: None}}
        assert len(found) == 1, f"vLLM refuses {module}: some but not all shards quantized"
        quantized = not dynamic_skip(qcfg, module) and found.pop() and (not head or qcfg.get("lm_head", False))
        for part in GPTQ_LINEAR if quantized else ("weight",):
            params[f"{module}.{part}"] = max(1, len(shards))
        if bias:
            params[f"{module}.bias"] = 1

    def text(p: str, c: dict, moe: bool) -> None:
        params[f"{p}model.embed_tokens.weight"] = params[f"{p}model.norm.weight"] = 1
        if not c.get("tie_word_embeddings", cfg.get("tie_word_embeddings")):
            linear(f"{p}lm_head", {}, head=True)
        for i in range(c["num_hidden_layers"]):
            layer = f"{p}model.layers.{i}"
            params[f"{layer}.input_layernorm.weight"] = params[f"{layer}.post_attention_layernorm.weight"] = 1
            linear(f"{layer}.self_attn.qkv_proj", {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
            linear(f"{layer}.self_attn.o_proj", {})
            if not moe:
                linear(f"{layer}.mlp.gate_up_proj", {"gate_proj": 0, "up_proj": 1})
                linear(f"{layer}.mlp.down_proj", {})
                continue
            params[f"{layer}.block_sparse_moe.gate.weight"] = 1  # GateLinear(quant_config=None)
            experts, n = f"{layer}.block_sparse_moe.experts", c["num_local_experts"]
            parts = ("weight",) if dynamic_skip(qcfg, experts) else GPTQ_MOE
            for part in parts:
                params[f"{experts}.routed_experts.w13_{part}"], params[f"{experts}.routed_experts.w2_{part}"] = 2 * n, n

    if arch != "pixtral":
        text("", cfg, arch == "mixtral")
        return params
    text("language_model.", cfg["text_config"], False)
    v = cfg["vision_config"]
    params["vision_tower.patch_conv.weight"] = params["vision_tower.ln_pre.weight"] = 1
    for i in range(v["num_hidden_layers"]):
        layer = f"vision_tower.transformer.layers.{i}"
        params[f"{layer}.attention_norm.weight"] = params[f"{layer}.ffn_norm.weight"] = 1
        linear(f"{layer}.attention.qkv_proj", {"q_proj": "q", "k_proj": "k", "v_proj": "v"})
        linear(f"{layer}.attention.o_proj", {})
        linear(f"{layer}.feed_forward.gate_up_proj", {"gate_proj": 0, "up_proj": 1})
        linear(f"{layer}.feed_forward.down_proj", {})
    bias = bool(cfg.get("multimodal_projector_bias", True))
    linear("multi_modal_projector.linear_1", {}, bias=bias)
    linear("multi_modal_projector.linear_2", {}, bias=bias)
    return params


def tensor_dtypes(folder: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_slice(k).get_dtype() for k in st.keys()})  # noqa: SIM118
    dtypes = {"I32": torch.int32, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    return {k: dtypes[v] for k, v in out.items()}


def replay(folder: Path) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(tensors that map to no vLLM parameter, parameters given fewer or more tensors than they take: got, expected)."""
    cfg = json.loads((folder / "config.json").read_text())
    arch = {"llava": "pixtral"}.get(cfg["model_type"], cfg["model_type"])
    tensors = tensor_dtypes(folder)
    expected = vllm_parameters(cfg, tensors)
    got: dict[str, set] = {}
    unmapped = []
    for name in tensors:
        param, shard = vllm_load(arch, name)
        if param is None:
            continue
        if param not in expected:
            unmapped.append(name)
            continue
        got.setdefault(param, set()).add(shard)
    counts = {p: len(got.get(p, ())) for p in expected if not p.endswith(MOE_ZERO_INIT)}
    wrong = {p: n for p, n in counts.items() if n != expected[p]}
    return unmapped, wrong, {p: expected[p] for p in wrong}


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory, one_thread):
    """(model, build, naming) -> folder; Mistral once (its names do not depend on the naming)."""
    root = tmp_path_factory.mktemp("vllm_names")
    out = {}
    for model, arch in ARCH.items():
        src = tiny_models.get(model)["hf"]
        for build, args in BUILDS.items():
            for names in ("vllm",) if arch == "mistral" else ("vllm", "gptqmodel"):
                dst = root / f"{model}-{build}-{names}"
                result = CliRunner().invoke(main, ["quantize", str(src), str(dst), *args, *ARGS,
                                                   "--export-names", names])  # fmt: skip
                assert result.exit_code == 0, result.output + str(result.exception)
                out[model, build, names] = dst
    return out


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("model", list(ARCH))
def test_every_tensor_of_the_default_export_loads_into_a_vllm_parameter(exports, model, build):
    folder = exports[model, build, "vllm"]
    unmapped, wrong, expected = replay(folder)
    assert not unmapped, f"vLLM {VLLM_VERSION} maps no parameter to {unmapped[:3]}"
    assert not wrong, f"vLLM parameters given the wrong number of tensors: {wrong} (expected {expected})"
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert ("dynamic" in qcfg) == (build == "bpw3" or model == "pixtral_12b")
    if model == "pixtral_12b":  # SGLang's Llava loader routes every name by these prefixes
        assert all(k.startswith(SGLANG_LLAVA) for k in tensor_dtypes(folder)), "SGLang would refuse a name"


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("model", ["mixtral", "pixtral_12b"])
def test_gptqmodel_naming_is_a_pure_renaming(exports, model, build):
    """Same tensors and config under GPTQModel's names; vLLM maps Llava's but not Mixtral's (hence the default)."""
    arch = ARCH[model]
    ours, theirs = exports[model, build, "vllm"], exports[model, build, "gptqmodel"]
    a, b = read_safetensors(ours), read_safetensors(theirs)
    assert set(a) != set(b)
    assert {export_name(arch, k, "gptqmodel"): v for k, v in a.items()}.keys() == b.keys()
    assert all(torch.equal(v, b[export_name(arch, k, "gptqmodel")]) for k, v in a.items())
    assert all(export_name(arch, k, "vllm") in a for k in b)
    config = [json.loads((f / "config.json").read_text()) for f in (ours, theirs)]
    assert config[0] == config[1]  # `dynamic` rules match both namings: one set of rules
    unmapped, wrong, _ = replay(theirs)
    if model == "mixtral":
        assert unmapped and all(".mlp." in n for n in unmapped)  # vLLM's MixtralDecoderLayer has no `mlp`
    else:
        assert not unmapped and not wrong  # vLLM's hf_to_vllm_mapper maps GPTQModel's Llava names
        assert not all(k.startswith(SGLANG_LLAVA) for k in b)  # SGLang's Llava loader does not


def test_card_says_which_loader_takes_which_naming():
    from quantkit.formats.gptq_format import gptq_loading_notes as loading_notes

    for arch in ("mixtral", "pixtral"):
        ours, theirs = (loading_notes(arch, 4, names=n) for n in ("vllm", "gptqmodel"))
        assert "(`--export-names vllm`, the default)" in ours and "GPTQModel does not load them" in ours
        assert "GPTQModel.load" in theirs and "GPTQModel.load" not in ours and "vllm serve DIR" in ours
        assert ("vllm serve DIR" in theirs) == (arch == "pixtral")  # vLLM maps GPTQModel's Llava names only
    mistral = loading_notes("mistral", 4)
    assert mistral == loading_notes("mistral", 4, names="gptqmodel") and "the same under" in mistral


def test_default_naming_is_the_converted_names_and_mistral_has_one(tiny_models):
    for model in ("mistral_large", "mixtral", "pixtral_12b"):
        names = tiny_models.get(model)["hf_tensors"]
        arch = ARCH[model]
        vllm = {export_name(arch, k, "vllm") for k in names}
        assert vllm == set(names)  # the default writes `convert`'s (the hub's) names
        same = {export_name(arch, k, "gptqmodel") for k in names} == vllm
        assert same == (arch == "mistral"), model


def test_replay_catches_what_vllm_refuses(exports, tmp_path):
    """The replay is not vacuous: a renamed tensor, a dropped shard or an extra tensor each fail it."""
    import shutil

    from safetensors.torch import save_file

    src = exports["mixtral", "b4", "vllm"]

    def edited(tag, edit):
        dst = tmp_path / tag
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file(edit(read_safetensors(src)), str(dst / "model.safetensors"))
        return replay(dst)

    unmapped, _, _ = edited("renamed", lambda t: {k.replace(".w1.", ".w4."): v for k, v in t.items()})
    assert unmapped
    _, wrong, _ = edited("dropped", lambda t: {k: v for k, v in t.items() if ".experts.3.w3.qweight" not in k})
    assert wrong == {"model.layers.0.block_sparse_moe.experts.routed_experts.w13_qweight": 7,
                     "model.layers.1.block_sparse_moe.experts.routed_experts.w13_qweight": 7}  # fmt: skip
    unmapped, _, _ = edited("extra", lambda t: {**t, "model.layers.0.mlp.gate.weight": torch.zeros(1)})
    assert unmapped == ["model.layers.0.mlp.gate.weight"]


def test_a_job_resumed_under_the_other_naming_writes_that_naming(exports, tiny_models, tmp_path, monkeypatch):
    """Job files keep one naming and the folder is renamed when assembled: a run stopped under
    `--export-names gptqmodel` and resumed with the default writes the same folder as a fresh default run."""
    from quantkit.quant import job as job_mod

    src, dst = tiny_models.get("mixtral")["hf"], tmp_path / "out"
    orig = job_mod.Job.finish

    def finish(self, step, *a, **k):
        orig(self, step, *a, **k)
        if step == "layer.0":
            raise KeyboardInterrupt  # stands in for a kill right after layer 0 was recorded

    monkeypatch.setattr(job_mod.Job, "finish", finish)
    args = ["quantize", str(src), str(dst), *BUILDS["b4"], *ARGS]
    assert CliRunner().invoke(main, [*args, "--export-names", "gptqmodel"]).exit_code == 130
    monkeypatch.setattr(job_mod.Job, "finish", orig)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "resuming at layer 1/2" in result.output, result.output
    fresh, resumed = read_safetensors(exports["mixtral", "b4", "vllm"]), read_safetensors(dst)
    assert fresh.keys() == resumed.keys() and all(torch.equal(v, resumed[k]) for k, v in fresh.items())
