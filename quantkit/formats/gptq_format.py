"""The GPTQ format: the checkpoint layout (qweight / qzeros / scales / g_idx, formats/gptq.py) that transformers,
GPTQModel, vLLM and ExLlamaV2 load, uniform 2/3/4/8 bits per module; a --bpw build gives each module its own width
in GPTQModel's `dynamic` rules, one width for the linears a loader fuses (q/k/v, gate/up, a MoE's experts).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import nn

from quantkit import __version__
from quantkit.arch.blocks import BLOCK_ROLES, SHARED_INPUT, block_of, expert_index, fused_names, moe_modules, role_of
from quantkit.errors import QuantkitError
from quantkit.formats.base import Built, OutputFormat, SolvedLinear
from quantkit.formats.gptq import (
    GPTQ_BITS,
    GPTQ_FORMATS,
    check_dynamic,
    gptq_pack,
    gptq_stored_bits,
    module_bits,
    module_sym,
)
from quantkit.formats.packed import PackedLinear
from quantkit.formats.spec import Candidate, LinearSpec, QuantSettings
from quantkit.kernels.qlinear import QuantLinear, gptq_to_packed

GPTQ_MARKERS = frozenset({"qweight", "qzeros", "scales", "g_idx"})


# The two spellings of Llava's text model: GPTQModel's / transformers 5's, and vLLM's module names (its
# hf_to_vllm_mapper maps the first to the second), which `--export-names vllm` also writes. Rules match both, whichever
# naming the folder has, so one set of rules serves the folder's names, GPTQModel's and vLLM's modules.
SPELLINGS = ("model.language_model.", "language_model.model.")
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
        return f"+:^{_names(layer)}\\.(?:{'|'.join(moe_modules())})\\.experts(?:\\.|$)"
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        raise ValueError(f"internal: one GPTQ setting for linears of different modules: {names}")
    leaves = sorted({n.rpartition(".")[2] for n in names})
    fused = fused_names().get(frozenset(leaves))
    if fused is not None:
        leaves.append(fused)
    return f"+:^{_names(parents.pop())}\\.(?:{'|'.join(leaves)})$"


def dynamic_rules(
    units: list[tuple[list[str], int]], head_bits: int | None, moe: bool, vision: bool, vision_bits: int | None,
    s: QuantSettings,
) -> dict:
    """GPTQModel's `dynamic` field: "-:" rules for what stays 16-bit (the projector; the vision tower unless
    vision_bits; lm_head without --head-bits; the MoE router), then one "+:" rule per unit of linears sharing one
    width (units: (exported names, bits)), the vision tower's and the head's; each "+:" rule with its width's grid
    symmetry (s.sym_for), which GPTQModel and vLLM read per module."""
    rules: dict[str, dict] = {}

    def width(bits: int) -> dict:
        return {"bits": bits, "sym": s.sym_for(bits)}

    if vision:
        rules[KEEP_PROJECTOR] = {}
        if vision_bits is None:
            rules[KEEP_VISION] = {}
        else:
            rules["+:" + KEEP_VISION[2:]] = width(vision_bits)
    if head_bits is None:
        rules["-:" + HEAD] = {}
    if moe:
        rules[rf"-:^(?:model\.)?layers\.\d+\.(?:{'|'.join(moe_modules())})\.gate$"] = {}
    if head_bits is not None:
        rules["+:" + HEAD] = width(head_bits)
    for names, bits in units:
        rules[unit_rule(names)] = width(bits)
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
GPTQMODEL_REFUSES = frozenset({("mixtral", "vllm"), ("pixtral", "vllm")})  # (arch, naming) GPTQModel 7.7 cannot load
GPTQMODEL_OTHER_NAMES = "GPTQModel: not under this folder's names; it loads an `--export-names gptqmodel` export."
SAME_NAMES = "Tensor names: the same under `--export-names vllm` and `gptqmodel`; the loaders above take them."


def gptq_loading_notes(arch: str | None, bits: int | None, mixed: bool = False, names: str = "vllm") -> str:
    """The "Loading" section of a GPTQ folder's model card: exact install lines per loader, the known misloads,
    and which loaders take this folder's tensor names."""
    cls = "AutoModelForImageTextToText" if arch == "pixtral" else "AutoModelForCausalLM"
    gptqmodel = 'GPTQModel: `pip install gptqmodel`, then `GPTQModel.load("DIR")`.'
    if arch == "pixtral":
        gptqmodel += " Its Llava loader also builds the image processor: PixtralProcessor needs torchvision."
    if (arch, names) in GPTQMODEL_REFUSES:
        gptqmodel = GPTQMODEL_OTHER_NAMES
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
        transformers_line = (
            "- transformers: does not load this mixed-bit folder (its GPTQ path ignores "
            "`quantization_config.dynamic` and stops with a size mismatch); use GPTQModel."
        )
    lines = [
        "- quantkit: `quantkit run DIR` or `quantkit eval DIR`.",
        f"- {gptqmodel}",
        transformers_line,
        f"- {vllm}",
    ]
    warning = f"> {SILENT_MISLOADS[arch]}\n\n" if arch in SILENT_MISLOADS else ""
    naming = NAMING_NOTES.get((arch, names), SAME_NAMES)
    return "## Loading\n\n" + warning + "\n".join(lines) + f"\n\n{naming}\n"


def gptq_units(b: Built) -> list[tuple[list[str], int]]:
    """Per layer, the linears that share one GPTQ setting (GPTQModel's names) and their bits: q/k/v, o, gate/up,
    down; a MoE layer's experts all together."""
    units: list[tuple[list[str], int]] = []
    for i, layer in enumerate(b.specs):
        groups: dict[str, list[str]] = {}
        for n in layer:
            blk = block_of(n)
            key = "experts" if expert_index(n) is not None else "shared" + blk if role_of(n) in SHARED_INPUT[blk] else n
            groups.setdefault(key, []).append(n)
        for names in groups.values():
            widths = {layer[n].bits for n in names}
            if len(widths) != 1 or not isinstance(next(iter(widths)), int):
                raise QuantkitError(f"internal: layer {i} {names} do not share one GPTQ width: {widths}")
            units.append(([b.export(f"layers.{i}.{n}", "gptqmodel") for n in names], widths.pop()))
    return units


class GPTQFormat(OutputFormat):
    name = "gptq"
    help = ("the GPTQ layout transformers, GPTQModel, vLLM, ExLlamaV2 load (with --bpw: per-module 2/3/4/8 bits in "
            "GPTQModel's `dynamic` rules)")  # fmt: skip
    widths = GPTQ_BITS
    # GPTQModel refuses a GPTQ folder whose top-level sym is false unless GPTQModel made it (a guard against old
    # quantizers' zero-point overflow, which quantkit's z >= 1 rules out): uniform builds stay symmetric by default;
    # --bpw builds set sym per module in `dynamic` and keep the top level true (no module takes it).
    uniform_sym = True
    key_tensor = "qweight"
    markers = GPTQ_MARKERS

    def check(self, s: QuantSettings, bpw: float | None, rotate: bool) -> None:
        if s.bits not in self.widths:
            raise QuantkitError(f"the GPTQ format stores 2, 3, 4 or 8 bits, not {s.bits}")
        super().check(s, bpw, rotate)

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        if in_features % 32 or out_features % 32:
            raise QuantkitError(
                f"the GPTQ format needs features divisible by 32; {name} is [{out_features}, {in_features}]"
            )

    def candidates(self, block: str, moe: bool) -> list[Candidate]:
        """What a GPTQ loader can run: every role uniform 2/3/4/8 bits at the run's group size, q/k/v one width and
        gate/up one width (o and down free); an MoE block takes one width for all its experts (vLLM's FusedMoE has
        one quantization method per layer)."""
        roles = BLOCK_ROLES[block]
        if moe and block == "mlp":
            return [Candidate(f"gptq {w}", tuple((r, ((w, 1.0),), None) for r in roles)) for w in GPTQ_BITS]
        shared = SHARED_INPUT[block]
        return [
            Candidate(f"gptq {a}/{w}", tuple((r, ((a if r in shared else w, 1.0),), None) for r in roles))
            for a in GPTQ_BITS
            for w in GPTQ_BITS
        ]

    def stored_bits(self, spec: LinearSpec, out_features: int, in_features: int, s: QuantSettings) -> int:
        return gptq_stored_bits(out_features, in_features, spec.bits, spec.group_size)

    def tensors(self, solved: SolvedLinear) -> dict[str, torch.Tensor]:
        res = solved.result
        return gptq_pack(res.q, res.scales, res.zeros, res.g_idx, res.bits)

    def quantization_config(self, b: Built) -> dict:
        """GPTQ's fields; per-module bits and what stays 16-bit as GPTQModel's `dynamic` rules (where needed);
        quantkit's own fields under "quantkit"."""
        s = b.settings
        qcfg = {
            "quant_method": self.name,
            "checkpoint_format": GPTQ_FORMATS[0],
            "bits": s.bits,
            "group_size": s.group_size or -1,
            "desc_act": s.act_order,
            "sym": s.sym_for(s.bits),
            "static_groups": s.static_groups,
            "damp_percent": s.damp,
            "true_sequential": True,
            "lm_head": b.head_bits is not None,
            "meta": {"quantizer": [f"quantkit:{__version__}"]},
            "quantkit": {"calibration": b.calibration, "clip": s.clip},
        }
        head_width = b.head_bits not in (None, s.bits)  # loaders take the head's width from `dynamic` only
        if b.bpw is not None or b.vision or head_width:
            units = gptq_units(b) if b.bpw is not None else []
            moe = any(".experts." in n for names, _ in units for n in names)
            qcfg["dynamic"] = dynamic_rules(units, b.head_bits, moe, b.vision, b.vision_bits, s)
            if units:
                qcfg["bits"] = base_bits([w for _, w in units])
                qcfg["sym"] = s.sym is not False  # every module has its rule; see uniform_sym
                qcfg["quantkit"]["bpw"] = b.bpw
        return qcfg

    def weight_count(self, prefix: str, index, qcfg: dict) -> int:
        """g_idx [in] and scales [groups, out]."""
        return index.infos[f"{prefix}.g_idx"].shape[0] * index.infos[f"{prefix}.scales"].shape[1]

    def own_fields(self, qcfg: dict) -> dict:
        return qcfg.get("quantkit") or {}

    def loading_notes(self, arch: str | None, qcfg: dict, names: str) -> str:
        return gptq_loading_notes(arch, qcfg.get("bits"), self.own_fields(qcfg).get("bpw") is not None, names)

    def check_config(self, qcfg: dict) -> None:
        if qcfg.get("bits") not in GPTQ_BITS or qcfg.get("checkpoint_format", GPTQ_FORMATS[0]) not in GPTQ_FORMATS:
            raise QuantkitError(
                f"GPTQ bits {qcfg.get('bits')} / checkpoint_format {qcfg.get('checkpoint_format')!r} are not "
                f"supported (bits {', '.join(map(str, GPTQ_BITS))}; format {' or '.join(GPTQ_FORMATS)})"
            )
        check_dynamic(qcfg.get("dynamic"))

    def linear(
        self, qcfg: dict, prefix: str, tensors: dict[str, torch.Tensor], backend: str, shape: tuple[int, int] | None
    ) -> nn.Module:
        """The GPTQ tensors as stored (GPTQTensors, repacked after loading); the width per module from `dynamic`
        in mixed-bit folders."""
        bits = module_bits(qcfg, prefix)
        if bits is None:
            raise QuantkitError(f"{prefix}: has GPTQ tensors, but a \"-:\" rule of quantization_config.dynamic says "
                                "it is not quantized")  # fmt: skip
        return GPTQTensors(tensors, bits, module_sym(qcfg, prefix), qcfg.get("checkpoint_format", GPTQ_FORMATS[0]),
                           prefix)  # fmt: skip

    def repack(self, module: nn.Module, backend: str) -> nn.Module:
        """GPTQTensors -> the QuantLinear of the same weights (gptq_to_packed, slice by slice), freeing the GPTQ
        tensors: called per linear, so the conversion's scratch memory is one linear's."""
        if not isinstance(module, GPTQTensors):
            return module
        return QuantLinear(module.packed(), backend=backend)


class GPTQTensors(nn.Module):
    """A GPTQ linear's tensors as the checkpoint stores them (qweight, qzeros, scales, g_idx, bias): the module the
    loader fills part by part, built with meta buffers shaped from the headers. It does not run: the runtime repacks
    it into a QuantLinear once loaded (GPTQFormat.repack)."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int, sym: bool, checkpoint_format: str, prefix: str):
        super().__init__()
        missing = {"qweight", "qzeros", "scales", "g_idx"} - set(tensors)
        if missing:
            raise QuantkitError(f"{prefix}: GPTQ tensors {', '.join(sorted(missing))} are missing")
        self.bits, self.sym, self.checkpoint_format, self.prefix = bits, sym, checkpoint_format, prefix
        self.in_features, self.out_features = tensors["g_idx"].shape[0], tensors["qweight"].shape[1]
        if tensors["qweight"].shape[0] * 32 != self.in_features * bits:
            raise QuantkitError(
                f"{prefix}: qweight {list(tensors['qweight'].shape)} does not hold {self.in_features} {bits}-bit rows"
            )
        for key, t in tensors.items():
            self.register_buffer(key, t)

    def packed(self) -> PackedLinear:
        """The loaded tensors in the quantkit layout (refused, naming the module, when they do not fit)."""
        try:
            return gptq_to_packed(dict(self.named_buffers()), self.bits, self.sym, self.checkpoint_format)
        except QuantkitError as e:
            raise QuantkitError(f"{self.prefix}: {e}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise QuantkitError(f"{self.prefix}: GPTQ tensors run once repacked (quantized_model.load_quantized does it)")
