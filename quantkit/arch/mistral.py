"""The Mistral family (Mistral, Mixtral, Pixtral, and the Llama decoder) declared as tables, once: checkpoint names
(native and HF), the layer kinds the quantizer and runtime walk (capture order, roles, experts, fused groups), the
parts of a model, and the names loaders give exports.

Each Entry maps one Mistral-native tensor name to its Hugging Face name, with the expected shape in named
dimensions (resolved from params.json) and, for q/k projections, the head count of the rotary permutation.
`{L}` is a decoder layer, `{E}` an expert, `{V}` a vision layer. A model is a list of tables; nothing in the
conversion engine branches on the architecture.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from quantkit.arch.blocks import BlockKind, register_kinds
from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class Entry:
    native: str
    hf: str
    shape: tuple[str, ...]
    rope_heads: str | None = None  # dimension name holding the head count for the q/k permutation
    bias: bool = False  # the multimodal projector biases, present or not depending on the checkpoint
    untied: bool = False  # only when the embeddings are not tied (params.json `tied_embeddings`)


TEXT = [
    Entry("tok_embeddings.weight", "model.embed_tokens.weight", ("vocab", "dim")),
    Entry("norm.weight", "model.norm.weight", ("dim",)),
    Entry("output.weight", "lm_head.weight", ("vocab", "dim"), untied=True),
    Entry("layers.{L}.attention_norm.weight", "model.layers.{L}.input_layernorm.weight", ("dim",)),
    Entry("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight", ("dim",)),
    Entry("layers.{L}.attention.wq.weight", "model.layers.{L}.self_attn.q_proj.weight", ("q_dim", "dim"), "heads"),
    Entry("layers.{L}.attention.wk.weight", "model.layers.{L}.self_attn.k_proj.weight", ("kv_dim", "dim"), "kv_heads"),
    Entry("layers.{L}.attention.wv.weight", "model.layers.{L}.self_attn.v_proj.weight", ("kv_dim", "dim")),
    Entry("layers.{L}.attention.wo.weight", "model.layers.{L}.self_attn.o_proj.weight", ("dim", "q_dim")),
]

DENSE_MLP = [
    Entry("layers.{L}.feed_forward.w1.weight", "model.layers.{L}.mlp.gate_proj.weight", ("ffn", "dim")),
    Entry("layers.{L}.feed_forward.w2.weight", "model.layers.{L}.mlp.down_proj.weight", ("dim", "ffn")),
    Entry("layers.{L}.feed_forward.w3.weight", "model.layers.{L}.mlp.up_proj.weight", ("ffn", "dim")),
]

# HF keeps w1/w2/w3 inside experts on disk (transformers 5 fuses them at load time).
MOE_MLP = [
    Entry("layers.{L}.feed_forward.gate.weight", "model.layers.{L}.block_sparse_moe.gate.weight", ("experts", "dim")),
    Entry(
        "layers.{L}.feed_forward.experts.{E}.w1.weight",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
        ("ffn", "dim"),
    ),
    Entry(
        "layers.{L}.feed_forward.experts.{E}.w2.weight",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
        ("dim", "ffn"),
    ),
    Entry(
        "layers.{L}.feed_forward.experts.{E}.w3.weight",
        "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
        ("ffn", "dim"),
    ),
]

_VE, _VT = "vision_encoder.", "vision_encoder.transformer.layers.{V}."
_HV = "vision_tower.transformer.layers.{V}."
VISION = [
    Entry(_VE + "patch_conv.weight", "vision_tower.patch_conv.weight", ("v_dim", "channels", "patch", "patch")),
    Entry(_VE + "ln_pre.weight", "vision_tower.ln_pre.weight", ("v_dim",)),
    Entry(_VT + "attention_norm.weight", _HV + "attention_norm.weight", ("v_dim",)),
    Entry(_VT + "ffn_norm.weight", _HV + "ffn_norm.weight", ("v_dim",)),
    Entry(_VT + "attention.wq.weight", _HV + "attention.q_proj.weight", ("v_dim", "v_dim"), "v_heads"),
    Entry(_VT + "attention.wk.weight", _HV + "attention.k_proj.weight", ("v_dim", "v_dim"), "v_heads"),
    Entry(_VT + "attention.wv.weight", _HV + "attention.v_proj.weight", ("v_dim", "v_dim")),
    Entry(_VT + "attention.wo.weight", _HV + "attention.o_proj.weight", ("v_dim", "v_dim")),
    Entry(_VT + "feed_forward.w1.weight", _HV + "feed_forward.gate_proj.weight", ("v_ffn", "v_dim")),
    Entry(_VT + "feed_forward.w2.weight", _HV + "feed_forward.down_proj.weight", ("v_dim", "v_ffn")),
    Entry(_VT + "feed_forward.w3.weight", _HV + "feed_forward.up_proj.weight", ("v_ffn", "v_dim")),
]

ADAPTER = [
    Entry("vision_language_adapter.w_in.weight", "multi_modal_projector.linear_1.weight", ("dim", "v_dim")),
    Entry("vision_language_adapter.w_in.bias", "multi_modal_projector.linear_1.bias", ("dim",), bias=True),
    Entry("vision_language_adapter.w_out.weight", "multi_modal_projector.linear_2.weight", ("dim", "dim")),
    Entry("vision_language_adapter.w_out.bias", "multi_modal_projector.linear_2.bias", ("dim",), bias=True),
]


# The module tree of our model (model/text.py, model/vision.py: HF names) as the quantizer and the runtime see it: per
# layer kind the capture groups in quantization order, the role of each linear, the MoE module, the fused groups.
_PROJ = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}  # fmt: skip
_QKV = ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj")
_GATE_UP = ("gate_proj", "up_proj")
register_kinds(
    {
        "dense": BlockKind(
            (
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"),
                ("mlp.down_proj",),
            ),
            _PROJ,
            fused=(_QKV, ("mlp", _GATE_UP, "gate_up_proj")),
        ),
        "moe": BlockKind(  # the router gate stays 16-bit; GPTQModel and transformers 5 call the MoE module `mlp`
            (
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                ("self_attn.o_proj",),
                ("block_sparse_moe.experts.{E}.w1", "block_sparse_moe.experts.{E}.w3"),
                ("block_sparse_moe.experts.{E}.w2",),
            ),
            {**_PROJ, "w1": "gate", "w3": "up", "w2": "down"},
            moe="block_sparse_moe",
            moe_aliases=("mlp",),
            fused=(_QKV,),
        ),
        "vision": BlockKind(
            (
                ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                ("attention.o_proj",),
                ("feed_forward.gate_proj", "feed_forward.up_proj"),
                ("feed_forward.down_proj",),
            ),
            _PROJ,
            fused=(("feed_forward", _GATE_UP, "gate_up_proj"),),
        ),
    },
    parts=(
        ("vision", ("vision_encoder.", "vision_tower.", "model.vision_tower.")),
        ("projector", ("vision_language_adapter.", "multi_modal_projector.", "model.multi_modal_projector.")),
    ),
    vision_embed=("vision_tower.patch_conv", "vision_tower.ln_pre"),
    vision_layers="vision_tower.transformer.layers",
)


@dataclass(frozen=True)
class Arch:
    """One architecture: its HF class and model_type, its text decoder's model_type, tables, the prefix HF puts
    before text tensors, the default context length, and which params.json it reads (`matches`)."""

    name: str
    hf_class: str
    model_type: str
    text_prefix: str
    tables: tuple[tuple[str, list[Entry]], ...]  # (part name, table)
    text_model_type: str = "mistral"
    max_positions: int = 131072  # when params.json gives no max_seq_len
    matches: Callable[[dict], bool] = field(default=lambda params: True, compare=False)
    export_names: tuple[tuple[str, str], ...] = ()  # (vLLM's prefix, GPTQModel's prefix): see *_EXPORT_NAMES below

    @property
    def has_vision(self) -> bool:
        return any(part == "vision" for part, _ in self.tables)


# Quantized exports carry one of two namings (`quantkit quantize --export-names`), per architecture a list of
# (vLLM's prefix, GPTQModel's prefix) pairs; `{L}` / `{E}` match any layer / expert index. Mistral and Llama have none:
# every loader takes the same names. Checked against the libraries' source (tests/test_vllm_names.py replays vLLM's):
# - `vllm` (the default) is what vLLM 0.34 and SGLang 0.5.23 load by name, and what `convert` writes (transformers'
#   legacy save_pretrained names, which our module names mirror): Mixtral's `block_sparse_moe.experts.E.w1/w2/w3` and
#   `block_sparse_moe.gate` (vLLM and SGLang map experts with ckpt names "w1"/"w2"/"w3", as in mistralai's own repo and
#   TheBloke's GPTQ branches), Llava's `language_model.model.*` / `language_model.lm_head`, `vision_tower.*`,
#   `multi_modal_projector.*` (SGLang's LlavaForConditionalGeneration routes on these prefixes only);
# - `gptqmodel` is GPTQModel 7.7's and transformers 5's: Mixtral as `mlp.experts.E.gate_proj/up_proj/down_proj` with
#   the router at `mlp.gate` (GPTQModel refuses a GPTQ Mixtral without them: "Missing required quantized weights"),
#   Llava as `model.language_model.*`, `lm_head`, `model.vision_tower.*`, `model.multi_modal_projector.*` (GPTQModel
#   refuses a GPTQ Pixtral under the legacy names; vLLM's Llava hf_to_vllm_mapper maps these to its own).
EXPORT_NAMINGS = ("vllm", "gptqmodel")
MIXTRAL_EXPORT_NAMES = (
    ("model.layers.{L}.block_sparse_moe.gate.", "model.layers.{L}.mlp.gate."),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w1.", "model.layers.{L}.mlp.experts.{E}.gate_proj."),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w2.", "model.layers.{L}.mlp.experts.{E}.down_proj."),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w3.", "model.layers.{L}.mlp.experts.{E}.up_proj."),
)
LLAVA_EXPORT_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    """Add an architecture; detect_arch tries the most recently registered first, so a variant registered after
    the base architecture it refines takes the params.json it matches."""
    ARCHS[arch.name] = arch
    return arch


register(Arch("mistral", "MistralForCausalLM", "mistral", "", (("text", TEXT), ("text", DENSE_MLP))))
register(
    Arch(
        "mixtral",
        "MixtralForCausalLM",
        "mixtral",
        "",
        (("text", TEXT), ("text", MOE_MLP)),
        text_model_type="mixtral",
        max_positions=32768,
        matches=lambda params: bool(params.get("moe")),
        export_names=MIXTRAL_EXPORT_NAMES,
    )  # fmt: skip
)
# The Llama decoder is Mistral's without a sliding window: HF folders of it (SmolLM2, Llama 2/3 fine-tunes) load and
# quantize as they are; it matches no params.json (a native checkpoint converts to MistralForCausalLM).
register(
    Arch("llama", "LlamaForCausalLM", "llama", "", (("text", TEXT), ("text", DENSE_MLP)), text_model_type="llama",
         matches=lambda params: False)
)  # fmt: skip
register(
    Arch(
        "pixtral",
        "LlavaForConditionalGeneration",
        "llava",
        "language_model.",
        (("text", TEXT), ("text", DENSE_MLP), ("vision", VISION), ("projector", ADAPTER)),
        matches=lambda params: bool(params.get("vision_encoder")),
        export_names=LLAVA_EXPORT_NAMES,
    )  # fmt: skip
)


@cache
def _export_patterns(arch: str, names: str) -> tuple[tuple[re.Pattern, str], ...]:
    """The arch's prefixes in the other naming as anchored regexes, with their replacements in `names`."""
    if names not in EXPORT_NAMINGS:
        raise QuantkitError(f"unknown export naming {names!r} (choose from {', '.join(EXPORT_NAMINGS)})")
    out = []
    for vllm, gptqmodel in ARCHS[arch].export_names:
        old, new = (vllm, gptqmodel) if names == "gptqmodel" else (gptqmodel, vllm)
        pattern = re.escape(old).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
        out.append((re.compile(pattern), new.replace("{L}", r"\g<L>").replace("{E}", r"\g<E>")))
    return tuple(out)


def export_name(arch: str, key: str, names: str = "gptqmodel") -> str:
    """A tensor name, in either naming, as written under `names` (EXPORT_NAMINGS); others pass unchanged. The default
    maps legacy names to GPTQModel's, which is how Checkpoint tells a folder in GPTQModel's naming."""
    for pattern, repl in _export_patterns(arch, names):
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def detect_arch(params: dict) -> Arch:
    """The architecture of a params.json: the most recently registered one that matches it."""
    return next(a for a in reversed(ARCHS.values()) if a.matches(params))


def runtime_arch(hf_class: str) -> str | None:
    """The runtime model for an HF architecture class: the first architecture registered with it."""
    return next((a.name for a in ARCHS.values() if a.hf_class == hf_class), None)


# transformers' defaults for fields a config.json may leave out (MistralConfig / MixtralConfig), per text
# model_type: our model and transformers must agree on any config.json.
TEXT_DEFAULTS = {
    "mistral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "max_position_embeddings": 131072,
    },
    "llama": {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "max_position_embeddings": 2048,
    },
    "mixtral": {
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": None,
        "max_position_embeddings": 131072,
        "num_experts_per_tok": 2,
        "num_local_experts": 8,
    },
}


def _need(d: dict, key: str, where: str = "params.json"):
    if key not in d or d[key] is None:
        raise QuantkitError(f"{where} has no {key!r}")
    return d[key]


def config_int(d: dict, key: str, where: str = "params.json", default: int | None = None) -> int:
    """A positive whole number from a config dict, or a one-line error naming the key and what was found."""
    v = d.get(key)
    if v is None:
        if default is None:
            raise QuantkitError(f"{where} has no {key!r}")
        return default
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())) or v <= 0:
        raise QuantkitError(f"{where}: {key!r} must be a positive whole number, got {v!r}")
    return int(v)


def model_dims(params: dict) -> dict[str, int]:
    """Named dimensions and repeat counts used by the tables, from params.json."""
    dim, heads = config_int(params, "dim"), config_int(params, "n_heads")
    head_dim = config_int(params, "head_dim", default=dim // heads)
    kv_heads = config_int(params, "n_kv_heads", default=heads)
    d = {
        "dim": dim,
        "vocab": config_int(params, "vocab_size"),
        "ffn": config_int(params, "hidden_dim"),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "q_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "L": config_int(params, "n_layers"),
        "tied": int(bool(params.get("tied_embeddings"))),
    }
    if params.get("moe"):
        d["experts"] = d["E"] = config_int(params["moe"], "num_experts", "params.json moe")
    if params.get("vision_encoder"):
        v = params["vision_encoder"]
        where = "params.json vision_encoder"
        d.update(
            v_dim=config_int(v, "hidden_size", where),
            v_ffn=config_int(v, "intermediate_size", where),
            v_heads=config_int(v, "num_attention_heads", where),
            channels=config_int(v, "num_channels", where, default=3),
            patch=config_int(v, "patch_size", where),
            V=config_int(v, "num_hidden_layers", where),
        )
    return d
