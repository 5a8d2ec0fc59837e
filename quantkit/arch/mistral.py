"""The Mistral family (Mistral, Mixtral, Pixtral) declared as tables.

Each Entry maps one Mistral-native tensor name to its Hugging Face name, with the expected shape in named
dimensions (resolved from params.json) and, for q/k projections, the head count of the rotary permutation.
`{L}` is a decoder layer, `{E}` an expert, `{V}` a vision layer. A model is a list of tables; nothing in the
conversion engine branches on the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class Entry:
    native: str
    hf: str
    shape: tuple[str, ...]
    rope_heads: str | None = None  # dimension name holding the head count for the q/k permutation
    bias: bool = False  # the multimodal projector biases, present or not depending on the checkpoint


TEXT = [
    Entry("tok_embeddings.weight", "model.embed_tokens.weight", ("vocab", "dim")),
    Entry("norm.weight", "model.norm.weight", ("dim",)),
    Entry("output.weight", "lm_head.weight", ("vocab", "dim")),
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


@dataclass(frozen=True)
class Arch:
    """One architecture: its HF class, model_type, tables, and the prefix HF puts before text tensors."""

    name: str
    hf_class: str
    model_type: str
    text_prefix: str
    tables: tuple[tuple[str, list[Entry]], ...]  # (part name, table)

    @property
    def has_vision(self) -> bool:
        return any(part == "vision" for part, _ in self.tables)


ARCHS = {
    "mistral": Arch("mistral", "MistralForCausalLM", "mistral", "", (("text", TEXT), ("text", DENSE_MLP))),
    "mixtral": Arch("mixtral", "MixtralForCausalLM", "mixtral", "", (("text", TEXT), ("text", MOE_MLP))),
    "pixtral": Arch(
        "pixtral",
        "LlavaForConditionalGeneration",
        "llava",
        "language_model.",
        (("text", TEXT), ("text", DENSE_MLP), ("vision", VISION), ("projector", ADAPTER)),
    ),
}


def detect_arch(params: dict) -> Arch:
    """vision_encoder -> Pixtral (Llava), moe -> Mixtral, otherwise Mistral."""
    if params.get("vision_encoder"):
        return ARCHS["pixtral"]
    if params.get("moe"):
        return ARCHS["mixtral"]
    return ARCHS["mistral"]


def _need(d: dict, key: str, where: str = "params.json"):
    if key not in d or d[key] is None:
        raise QuantkitError(f"{where} has no {key!r}")
    return d[key]


def _int(d: dict, key: str, where: str = "params.json", default: int | None = None) -> int:
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
    dim, heads = _int(params, "dim"), _int(params, "n_heads")
    head_dim = _int(params, "head_dim", default=dim // heads)
    kv_heads = _int(params, "n_kv_heads", default=heads)
    d = {
        "dim": dim,
        "vocab": _int(params, "vocab_size"),
        "ffn": _int(params, "hidden_dim"),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "q_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "L": _int(params, "n_layers"),
    }
    if params.get("moe"):
        d["experts"] = d["E"] = _int(params["moe"], "num_experts", "params.json moe")
    if params.get("vision_encoder"):
        v = params["vision_encoder"]
        where = "params.json vision_encoder"
        d.update(
            v_dim=_int(v, "hidden_size", where),
            v_ffn=_int(v, "intermediate_size", where),
            v_heads=_int(v, "num_attention_heads", where),
            channels=_int(v, "num_channels", where, default=3),
            patch=_int(v, "patch_size", where),
            V=_int(v, "num_hidden_layers", where),
        )
    return d


# Quantization order inside a decoder layer (runtime module names, relative to `layers.{i}`). Linears in one
# group share their input and are solved together; each group is captured after the previous groups were
# quantized, so it sees their quantized outputs. `{E}` expands to every expert. The router gate stays 16-bit.
CAPTURE_GROUPS = {
    "dense": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    "moe": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("block_sparse_moe.experts.{E}.w1", "block_sparse_moe.experts.{E}.w3"),
        ("block_sparse_moe.experts.{E}.w2",),
    ),
    "vision": (
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        ("attention.o_proj",),
        ("feed_forward.gate_proj", "feed_forward.up_proj"),
        ("feed_forward.down_proj",),
    ),
}
