"""The `dynamic` rules of a --bpw --format gptq build, read as GPTQModel and vLLM read them, for every layer of the
real Pixtral-Large, Mistral-Large and Mixtral layouts (metadata only: meta-device models, a synthetic measurement).

Both loaders decide a module by the first rule whose regex re.match-es its name; a "-:" rule means not quantized:
  - vLLM, model_executor/layers/quantization/utils/gptq_utils.py get_dynamic_override (copied in vllm_bits below);
  - GPTQModel, quantization/config.py dynamic_get / _resolve_dynamic_override (same order and anchoring, plus an
    exact-literal fast path for patterns of the form ^literal$, which ours are not); re-implemented in
    gptqmodel_bits. tests/interop/gptqmodel_dynamic.py checks GPTQModel's own dynamic_get on the same cases.
Names: GPTQModel loads through transformers (separate q/k/v, gate/up, per-expert linears; Llava under
`model.language_model.`); vLLM fuses q/k/v into qkv_proj, gate/up into gate_up_proj, a layer's experts into one
FusedMoE `experts` (Mixtral: under `block_sparse_moe`), and names Llava's parts `language_model.model.`,
`language_model.lm_head`, `vision_tower.`, `multi_modal_projector.`. The folder's names are either naming
(`--export-names vllm`, the default, or `gptqmodel`): the rules, the same for both, must match each.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from test_convert_scale import REAL, as_infos, native_tensor_list

from quantkit.arch import export_name
from quantkit.arch.blocks import block_of, expert_index, vision_layers
from quantkit.convert.pipeline import plan_conversion
from quantkit.formats.registry import get_format
from quantkit.model.config import parse_config
from quantkit.model.load import build_model
from quantkit.quant.allocate import allocate
from quantkit.quant.assemble import output_config
from quantkit.quant.capture import QuantSettings
from quantkit.quant.measure import spec_for_candidate
from quantkit.quant.plan import linear_shapes
from quantkit.quant.settings import QuantizeOptions

GPTQ = get_format("gptq")

MODELS = ["Pixtral-Large-Instruct-2411", "Mistral-Large-Instruct-2407", "Mixtral-8x7B-Instruct-v0.1"]
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}  # fmt: skip


def gptqmodel_bits(qcfg: dict, name: str):
    """GPTQModel's dynamic_get(dynamic, name, "bits", base): False for a negative match, else bits."""
    for pattern, overrides in qcfg["dynamic"].items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.compile(raw).match(name):
            return False if negative else overrides.get("bits", qcfg["bits"])
    return qcfg["bits"]


def vllm_bits(qcfg: dict, name: str):
    """vLLM's get_dynamic_override(config, name, "bits", config.weight_bits); False = UnquantizedLinearMethod."""
    for pattern, pattern_dict in qcfg["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), name):
                return False
        elif re.match(pattern.removeprefix("+:"), name):
            return pattern_dict.get("bits", qcfg["bits"])
    return qcfg["bits"]


def vllm_name(exported: str, arch: str) -> str:
    """The prefix vLLM gives the module holding this exported linear, in either naming (fused where vLLM fuses)."""
    parent, _, leaf = exported.rpartition(".")
    if expert_index(exported) is not None:  # model.layers.N.{mlp,block_sparse_moe}.experts.E.x -> ...block_sparse_moe
        return re.sub(r"\.(?:mlp|block_sparse_moe)\.experts\..*$", ".block_sparse_moe.experts", exported)
    name = f"{parent}.{FUSED.get(leaf, leaf)}" if parent else leaf
    if arch == "pixtral":
        for old, new in (("model.language_model.", "language_model.model."), ("lm_head", "language_model.lm_head"),
                         ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector.")):  # fmt: skip
            if name.startswith(old):
                return new + name[len(old) :]
    return name


def synthetic_measurement(shapes, s: QuantSettings, seed: int = 0) -> dict:
    """Per layer and block, every GPTQ candidate with its exact cost and a random error that falls with bits."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for layer in shapes:
        entry = {}
        for b in ("attn", "mlp"):
            names = [n for n in layer if block_of(n) == b]
            moe = any(expert_index(n) is not None for n in names)
            numel = sum(math.prod(layer[n]) for n in names)
            entry[b] = []
            for c in GPTQ.candidates(b, moe):
                bits = sum(GPTQ.stored_bits(spec_for_candidate(c, n, layer[n][1], s, None), *layer[n], s)
                           for n in names)  # fmt: skip
                error = math.exp(-bits / numel) * (1 + float(torch.rand(1, generator=g)))
                entry[b].append({"candidate": c.name, "bits": bits, "error": error})
        layers.append(entry)
    return {"layers": layers}


def real_build(model_name: str, target: float = 3.0, names: str = "vllm") -> dict:
    """The real layout's allocation at target bpw and its quantization_config, plus every name to check (in the
    export's naming, `names`)."""
    params, _, _ = REAL[model_name]
    plan = plan_conversion(params, as_infos(native_tensor_list(params)))
    cfg = parse_config(plan.config)
    model = build_model(cfg)
    ckpt = SimpleNamespace(config=cfg, key=lambda n: export_name(cfg.arch, cfg.checkpoint_key(n), names))
    shapes = [linear_shapes(model, i) for i in range(len(model.layers))]
    s = QuantSettings(bits=4, group_size=128, act_order=True)
    alloc = allocate(synthetic_measurement(shapes, s), shapes, target, s, lambda i, n: None, "gptq")
    o = QuantizeOptions(settings=s, fmt="gptq", bpw=target, export_names=names)
    qcfg = output_config(ckpt, o, alloc.specs, {}, model.vision_tower is not None)
    modules = {ckpt.key(f"layers.{i}.{n}.weight").removesuffix(".weight"): sp.bits
               for i, layer in enumerate(alloc.specs) for n, sp in layer.items()}  # fmt: skip
    kept = [ckpt.key("lm_head.weight").removesuffix(".weight")]
    if model.vision_tower is not None:
        vt = model.get_submodule(vision_layers())
        kept += [ckpt.key(f"{vision_layers()}.{j}.{n}.weight").removesuffix(".weight")
                 for j in range(len(vt)) for n, m in vt[j].named_modules() if isinstance(m, torch.nn.Linear)]
        kept += [ckpt.key(f"multi_modal_projector.{n}.weight").removesuffix(".weight")
                 for n, m in model.multi_modal_projector.named_modules() if isinstance(m, torch.nn.Linear)]
    if cfg.arch == "mixtral":
        kept += [ckpt.key(f"layers.{i}.block_sparse_moe.gate.weight").removesuffix(".weight")
                 for i in range(len(model.layers))]  # fmt: skip
    return dict(arch=cfg.arch, qcfg=qcfg, modules=modules, kept=kept, alloc=alloc)


@pytest.mark.parametrize("names", ["vllm", "gptqmodel"])
@pytest.mark.parametrize("model_name", MODELS)
def test_every_module_gets_the_allocated_bits_in_both_loaders(model_name, names):
    b = real_build(model_name, names=names)
    qcfg, arch, alloc = b["qcfg"], b["arch"], b["alloc"]
    assert 3.0 - 0.02 <= alloc.bpw <= 3.0  # at real scale too
    n_layers = len(alloc.specs)
    assert len(b["modules"]) == n_layers * (7 if arch != "mixtral" else 3 * 8 + 4)
    by_vllm: dict[str, set] = {}
    for name, bits in b["modules"].items():
        assert gptqmodel_bits(qcfg, name) == bits, name
        by_vllm.setdefault(vllm_name(name, arch), set()).add(bits)
    for name, widths in by_vllm.items():
        assert len(widths) == 1, name  # what vLLM fuses shares one width
        assert vllm_bits(qcfg, name) == widths.pop(), name
    assert len(by_vllm) == n_layers * (4 if arch != "mixtral" else 3)  # qkv, o, gate_up, down | qkv, o, experts
    assert any("qkv_proj" in n for n in by_vllm) and (arch == "mixtral" or any("gate_up_proj" in n for n in by_vllm))
    assert len(set(b["modules"].values())) > 1  # mixed
    for name in b["kept"]:
        assert gptqmodel_bits(qcfg, name) is False, name
        assert vllm_bits(qcfg, vllm_name(name, arch)) is False, name
    if arch == "pixtral":
        assert sum("vision_tower" in n for n in b["kept"]) == 40 * 7
        assert vllm_bits(qcfg, "vision_tower.transformer.layers.0.attention.qkv_proj") is False
        assert vllm_bits(qcfg, "vision_tower.transformer.layers.39.feed_forward.gate_up_proj") is False
    # the base `bits` routes vLLM: plain GPTQ kernel when any module has 2/3 bits, Marlin only for 4/8-bit builds
    widths = set(b["modules"].values())
    assert (qcfg["bits"] in (2, 3)) == bool(widths & {2, 3})


@pytest.mark.parametrize("model_name", [MODELS[0], MODELS[2]])
def test_both_namings_get_one_set_of_rules(model_name):
    """Llava's and Mixtral's names differ between the namings; the rules, written for both, do not."""
    vllm, gptqmodel = (real_build(model_name, names=n) for n in ("vllm", "gptqmodel"))
    assert set(vllm["modules"]) != set(gptqmodel["modules"])
    assert vllm["qcfg"] == gptqmodel["qcfg"]


@pytest.mark.parametrize(
    ("dynamic", "message"),
    [
        ({"+:^model\\.(": {"bits": 3}}, "bad regex"),
        ({"+:^model\\.": {"bits": 5}}, "bits 5 is not a GPTQ width"),
        ({"+:^model\\.": 3}, "must be a JSON object"),
        (["-:lm_head"], "must be a JSON object, not list"),
    ],
)
def test_a_bad_dynamic_field_is_refused_before_loading(dynamic, message):
    from quantkit.errors import QuantkitError
    from quantkit.quantized_model import quantized_prepare

    with pytest.raises(QuantkitError, match=message):
        quantized_prepare({"quant_method": "gptq", "bits": 4, "dynamic": dynamic}, "torch")


def test_first_matching_rule_decides():
    from quantkit.formats.gptq import module_bits

    qcfg = {"bits": 4, "dynamic": {"-:^lm_head$": {}, "+:^model\\.layers\\.1\\.": {"bits": 2},
                                   "+:^model\\.layers\\.1": {"bits": 8}}}  # fmt: skip
    assert module_bits(qcfg, "lm_head") is None
    assert module_bits(qcfg, "model.layers.1.mlp.down_proj") == 2  # the first of two matching rules
    assert module_bits(qcfg, "model.layers.10.mlp.down_proj") == 8  # re.match: no end anchor
    assert module_bits(qcfg, "model.layers.2.mlp.down_proj") == 4  # no rule: `bits`
    assert module_bits(qcfg, "x.model.layers.1.mlp.down_proj") == 4  # anchored at the start
