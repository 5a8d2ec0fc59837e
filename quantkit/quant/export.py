"""What a quantized model folder holds: packed tensors per linear, quantization_config, a model card.

Formats (docs/format.md): `gptq` is the GPTQ checkpoint layout (qweight / qzeros / scales / g_idx) that
transformers, GPTQModel, vLLM and ExLlamaV2 load, for uniform bits; `quantkit` is the project's own layout
(bit planes, segments of mixed widths, act order as an input permutation), which the --bpw builds need.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from quantkit import __version__
from quantkit.formats.gptq import gptq_pack, pack_gptq_result
from quantkit.formats.packed import FORMAT_VERSION, to_tensors
from quantkit.quant.capture import QuantSettings, Solved


def linear_tensors(fmt: str, solved: Solved) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear, by suffix (`qweight`, `qmeta`, ...), for the given format."""
    res = solved.result
    if fmt == "gptq":
        return gptq_pack(res.q, res.scales, res.zeros, res.g_idx, res.bits)
    return to_tensors(pack_gptq_result(res, had_in=solved.had_in, had_in_block=solved.had_in_block))


def build_quantization_config(fmt: str, s: QuantSettings, calibration: dict, head_bits: int | None) -> dict:
    """The `quantization_config` block of config.json."""
    if fmt == "quantkit":
        return {
            "quant_method": "quantkit",
            "format_version": FORMAT_VERSION,
            "bits": s.bits,
            "head_bits": head_bits,
            "group_size": s.group_size or -1,
            "act_order": s.act_order,
            "sym": s.sym,
            "damp_percent": s.damp,
            "clip": s.clip,
            "calibration": calibration,
            "producer": f"quantkit {__version__}",
        }
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": s.bits,
        "group_size": s.group_size or -1,
        "desc_act": s.act_order,
        "sym": s.sym,
        "static_groups": s.static_groups,
        "damp_percent": s.damp,
        "true_sequential": True,
        "lm_head": head_bits is not None,
        "meta": {"quantizer": [f"quantkit:{__version__}"]},
        "quantkit": {"calibration": calibration, "clip": s.clip},
    }


# The two spellings of Llava's text model: GPTQModel's / transformers 5's, and vLLM's module names (its
# hf_to_vllm_mapper maps the first to the second), which `--export-names vllm` also writes. Rules match both, whichever
# naming the folder has, so one set of rules serves the folder's names, GPTQModel's and vLLM's modules.
SPELLINGS = ("model.language_model.", "language_model.model.")
FUSED = {frozenset(("q_proj", "k_proj", "v_proj")): "qkv_proj", frozenset(("gate_proj", "up_proj")): "gate_up_proj"}
MOE_MODULES = ("mlp", "block_sparse_moe")  # GPTQModel's and vLLM's (and `--export-names vllm`) Mixtral MoE module
# Parts a Llava folder keeps 16-bit, in transformers' (`model.vision_tower`) and vLLM's (`vision_tower`) names.
KEEP_VISION = r"-:^(?:model\.)?vision_tower\."
KEEP_PROJECTOR = r"-:^(?:model\.)?multi_modal_projector\."
HEAD = r"^(?:language_model\.)?lm_head$"


def _names(prefix: str) -> str:
    """A regex for a module path prefix in either spelling (SPELLINGS, in that order whichever one prefix has)."""
    old = next((sp for sp in SPELLINGS if prefix.startswith(sp)), None)
    if old is None:
        return re.escape(prefix)
    return "(?:" + "|".join(re.escape(sp + prefix[len(old) :]) for sp in SPELLINGS) + ")"


def unit_rule(names: list[str]) -> str:
    """The "+:" rule for linears that share one setting (either naming): their separate names and the fused one
    vLLM builds (q/k/v -> qkv_proj, gate/up -> gate_up_proj); for MoE experts the whole block, which vLLM fuses
    into one `experts` module (named under mlp or block_sparse_moe)."""
    if any(".experts." in n for n in names):
        layer, _, _ = names[0].partition(".experts.")[0].rpartition(".")
        return f"+:^{_names(layer)}\\.(?:{'|'.join(MOE_MODULES)})\\.experts(?:\\.|$)"
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        raise ValueError(f"internal: one GPTQ setting for linears of different modules: {names}")
    leaves = sorted({n.rpartition(".")[2] for n in names})
    if frozenset(leaves) in FUSED:
        leaves.append(FUSED[frozenset(leaves)])
    return f"+:^{_names(parents.pop())}\\.(?:{'|'.join(leaves)})$"


def dynamic_rules(
    units: list[tuple[list[str], int]], head_bits: int | None, moe: bool, vision: bool, vision_bits: int | None
) -> dict:
    """GPTQModel's `dynamic` field: "-:" rules for what stays 16-bit (the projector; the vision tower unless
    vision_bits; lm_head without --head-bits; the MoE router), then one "+:" rule per unit of linears sharing one
    width (units: (exported names, bits)), the vision tower's and the head's."""
    rules: dict[str, dict] = {}
    if vision:
        rules[KEEP_PROJECTOR] = {}
        if vision_bits is None:
            rules[KEEP_VISION] = {}
        else:
            rules["+:" + KEEP_VISION[2:]] = {"bits": vision_bits}
    if head_bits is None:
        rules["-:" + HEAD] = {}
    if moe:
        rules[rf"-:^(?:model\.)?layers\.\d+\.(?:{'|'.join(MOE_MODULES)})\.gate$"] = {}
    if head_bits is not None:
        rules["+:" + HEAD] = {"bits": head_bits}
    for names, bits in units:
        rules[unit_rule(names)] = {"bits": bits}
    return rules


def base_bits(widths: list[int]) -> int:
    """The `bits` field of a mixed folder: its most common width, among 2 and 3 bits when it has any, so that
    vLLM picks its plain GPTQ kernel (which runs 2/3/4/8) and not Marlin (4/8 only, chosen from `bits`)."""
    low = [w for w in widths if w in (2, 3)]
    return Counter(low or widths).most_common(1)[0][0]


# Loaders known to misload an export without an error, by architecture: said in the model card and the README.
SILENT_MISLOADS = {
    "mixtral": (
        "**Do not load this Mixtral GPTQ folder with transformers.** transformers 5 fuses Mixtral's experts into "
        "3-D tensors that have no GPTQ form: it reports the quantized expert tensors as UNEXPECTED and the fused ones "
        "as MISSING, initializes them at random and raises no error, so the output is garbage. Use `quantkit run`, "
        "GPTQModel (on an `--export-names gptqmodel` export; checked: same weights and greedy tokens as quantkit) or "
        "vLLM (see below)."
    ),
}
# Which loaders take the tensor names of each naming (`--export-names`, quantkit.arch EXPORT_NAMINGS) where they
# differ; vLLM 0.34 and SGLang 0.5.23 read from their source (tests/test_vllm_names.py), GPTQModel 7.7 run (interop).
NAMING_NOTES = {
    ("mixtral", "vllm"): (
        "Tensor names (`--export-names vllm`, the default): Mixtral's own `block_sparse_moe.experts.E.w1/w2/w3` and "
        "`block_sparse_moe.gate`, which vLLM's and SGLang's Mixtral loaders map (read from their source, not run "
        "here). GPTQModel does not load them: for GPTQModel, quantize with `--export-names gptqmodel`."
    ),
    ("mixtral", "gptqmodel"): (
        "Tensor names (`--export-names gptqmodel`): GPTQModel's `mlp.experts.E.gate_proj/up_proj/down_proj` and "
        "`mlp.gate`, which vLLM's and SGLang's Mixtral loaders do not map: for them, quantize with "
        "`--export-names vllm` (the default)."
    ),
    ("pixtral", "vllm"): (
        "Tensor names (`--export-names vllm`, the default): `language_model.model.*`, `language_model.lm_head`, "
        "`vision_tower.*`, `multi_modal_projector.*`, which vLLM's and SGLang's Llava loaders take (read from their "
        "source, not run here). GPTQModel does not load them: for GPTQModel, quantize with `--export-names gptqmodel`."
    ),
    ("pixtral", "gptqmodel"): (
        "Tensor names (`--export-names gptqmodel`): `model.language_model.*`, `lm_head`, `model.vision_tower.*`, "
        "`model.multi_modal_projector.*`, which GPTQModel and transformers load and vLLM's Llava loader maps to its "
        "own (read from its source); SGLang's Llava loader does not: for SGLang, quantize with `--export-names vllm` "
        "(the default)."
    ),
}
SAME_NAMES = "Tensor names: the same under `--export-names vllm` and `gptqmodel`; the loaders above take them."


def loading_notes(fmt: str, arch: str | None, bits: int | None, mixed: bool = False, names: str = "vllm") -> str:
    """The "Loading" section of the model card: exact install lines per loader, the known misloads, and which
    loaders take this folder's tensor names."""
    if fmt == "quantkit":
        return "## Loading\n\nThe quantkit format is read by quantkit: `quantkit run DIR`, `quantkit eval DIR`.\n"
    cls = "AutoModelForImageTextToText" if arch == "pixtral" else "AutoModelForCausalLM"
    gptqmodel = 'GPTQModel: `pip install gptqmodel`, then `GPTQModel.load("DIR")`.'
    if arch == "pixtral":
        gptqmodel += " Its Llava loader also builds the image processor: PixtralProcessor needs torchvision."
    if (arch, names) in (("mixtral", "vllm"), ("pixtral", "vllm")):
        gptqmodel = "GPTQModel: not under this folder's names; it loads an `--export-names gptqmodel` export."
    vllm = "vLLM: `pip install vllm`, then `vllm serve DIR`."
    if bits in (2, 3):
        vllm = "vLLM: `pip install vllm`, then `vllm serve DIR --dtype float16` (2- and 3-bit GPTQ runs on vLLM's "
        vllm += "plain gptq kernel, which takes float16 only)."
    if (arch, names) == ("mixtral", "gptqmodel"):
        vllm = "vLLM: not under this folder's names; it loads an `--export-names vllm` export (the default)."
    transformers_line = (
        "- transformers: `pip install optimum gptqmodel` (transformers loads GPTQ through both), then "
        f'`{cls}.from_pretrained("DIR")`.'
    )
    if mixed:
        transformers_line = ("- transformers: does not load this mixed-bit folder (its GPTQ path ignores "
                             "`quantization_config.dynamic` and stops with a size mismatch); use GPTQModel.")
    lines = [
        "- quantkit: `quantkit run DIR` or `quantkit eval DIR`.",
        f"- {gptqmodel}",
        transformers_line,
        f"- {vllm}",
    ]
    warning = f"> {SILENT_MISLOADS[arch]}\n\n" if arch in SILENT_MISLOADS else ""
    naming = NAMING_NOTES.get((arch, names), SAME_NAMES)
    return "## Loading\n\n" + warning + "\n".join(lines) + f"\n\n{naming}\n"


def model_card(
    name: str,
    fmt: str,
    s: QuantSettings,
    calibration: dict,
    size_bytes: int,
    head_bits: int | None,
    bpw: float | None = None,
    rotate: bool = False,
    arch: str | None = None,
    gptq_bits: int | None = None,
    group_why: str | None = None,
    names: str = "vllm",
) -> str:
    """README.md for the output folder: the parameter table GPTQ users expect, and how to load the folder.
    gptq_bits: the `bits` of a mixed GPTQ build's quantization_config (what decides vLLM's kernel).
    group_why: why --group-size auto did not choose 128 (so a card of auto -> 128 equals one of --group-size 128).
    names: the export's naming (--export-names), for which loaders take it."""
    group = s.group_size or "none (per channel)"
    if group_why:
        group = f"{s.group_size or 'none, per channel'} (auto: {group_why})"
    rows = [
        ("Format", fmt),
        ("Bits", f"{bpw} bpw (mixed)" if bpw else s.bits),
        ("Hadamard rotation", rotate),
        ("Head bits", head_bits or 16),
        ("Group size", group),
        ("Act order", s.act_order),
        ("Symmetric", s.sym),
        ("Damp", f"{s.damp} (fraction of the mean Hessian diagonal)"),  # a fraction, not a percent
        ("Dataset", calibration.get("dataset")),
        ("Rows x seq len", f"{calibration.get('rows')} x {calibration.get('seq_len')}"),
        ("Size", f"{size_bytes / 1e9:.2f} GB"),
        ("Quantizer", f"quantkit {__version__}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    intro = "Quantized with quantkit (GPTQ, calibrated layer by layer)."
    notes = loading_notes(fmt, arch, gptq_bits or (None if bpw else s.bits), gptq_bits is not None, names)
    return f"# {name}\n\n{intro}\n\n| parameter | value |\n|---|---|\n{table}\n\n{notes}"
