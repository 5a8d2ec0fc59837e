"""params.json -> config.json and generation_config.json.

Every value is written explicitly (head_dim, rope_theta, the vision activation...), because loaders differ in
their defaults: transformers' Pixtral config defaults the vision activation to gelu (the model uses SiLU), the
HF Mistral converter defaults rope_theta to 1e4 (mistral-inference uses 1e6), exllamav2 reads several vision
fields with no default at all.
"""

from __future__ import annotations

from quantkit.arch import Arch
from quantkit.errors import QuantkitError

MISTRAL_ROPE_THETA = 1e6  # mistral-inference's default when params.json has none
VISION_ROPE_THETA = 1e4

# params.json vision_encoder key -> HF vision_config key (copied as they are).
VISION_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_channels", "num_channels"),
    ("image_size", "image_size"),
    ("patch_size", "patch_size"),
)


def _sliding_window(params: dict) -> int | None:
    value = params.get("sliding_window", params.get("_sliding_window"))
    return int(value) if value not in (None, "", "null") else None


def text_config(arch: Arch, params: dict, dims: dict[str, int], bos_id: int, eos_id: int, dtype: str) -> dict:
    """The decoder's HF config (top level for Mistral/Mixtral, `text_config` for Llava)."""
    cfg = {
        "architectures": [arch.hf_class] if arch.model_type != "llava" else ["MistralForCausalLM"],
        "model_type": arch.text_model_type,
        "hidden_size": dims["dim"],
        "intermediate_size": dims["ffn"],
        "num_hidden_layers": dims["L"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": float(params.get("norm_eps", 1e-5)),
        "rope_theta": float(params.get("rope_theta") or MISTRAL_ROPE_THETA),
        "max_position_embeddings": int(
            params.get("max_seq_len") or params.get("max_position_embeddings") or arch.max_positions
        ),
        "sliding_window": _sliding_window(params),
        "vocab_size": dims["vocab"],
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(dims.get("tied")),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch.text_model_type == "mixtral":
        cfg.update(
            num_local_experts=dims["experts"],
            num_experts_per_tok=int(params["moe"].get("num_experts_per_tok", 2)),
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        )
    return cfg


def vision_config(params: dict) -> dict:
    v = params["vision_encoder"]
    cfg = {"model_type": "pixtral"}
    for src_key, hf_key in VISION_FIELDS:
        if src_key in v:
            cfg[hf_key] = int(v[src_key])
    cfg.setdefault("num_channels", 3)
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["hidden_act"] = "silu"
    cfg["rope_theta"] = float(v.get("rope_theta") or VISION_ROPE_THETA)
    cfg["attention_dropout"] = 0.0
    return cfg


def build_config(
    arch: Arch,
    params: dict,
    dims: dict[str, int],
    *,
    dtype: str,
    bos_id: int = 1,
    eos_id: int = 2,
    image_token_id: int | None = None,
    projector_bias: bool = True,
) -> dict:
    """The full config.json for the architecture."""
    text = text_config(arch, params, dims, bos_id, eos_id, dtype)
    if arch.model_type != "llava":
        return text
    if image_token_id is None:
        raise QuantkitError("no image token id: params.json vision_encoder has no image_token_id and no tokenizer")
    return {
        "architectures": [arch.hf_class],
        "model_type": "llava",
        "image_token_index": image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": projector_bias,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "image_seq_length": 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision_config(params),
    }


def generation_config(bos_id: int, eos_id: int) -> dict:
    return {"bos_token_id": bos_id, "eos_token_id": eos_id}
