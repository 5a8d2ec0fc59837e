"""What the runtime needs from config.json: the text decoder, and for Pixtral the vision tower and projector.

Read once into frozen dataclasses so the model code never touches dicts. Both spellings of RoPE settings are
accepted (transformers 4 `rope_theta`, transformers 5 `rope_parameters`). Fields that are absent take the value
transformers would give them, so our model and transformers agree on any config.json. Anything the model code
cannot run (another architecture, scaled RoPE, a CLS-dropping feature strategy) is refused here with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.arch import ARCHS, TEXT_DEFAULTS, config_int, runtime_arch
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import read_json
from quantkit.model.modules import ACTIVATIONS

CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class TextConfig:
    """The Mistral/Mixtral decoder. n_experts == 0 means a dense SwiGLU MLP."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    sliding_window: int | None = None
    n_experts: int = 0
    top_k: int = 0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False  # lm_head is the embedding matrix (no lm_head tensor on disk)


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision encoder (head_dim is hidden/heads, as transformers computes it: 88 for Pixtral-Large)."""

    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    channels: int
    patch_size: int
    image_size: int
    rope_theta: float
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole model: its architecture, the text decoder and, for Pixtral, vision tower and projector settings."""

    arch: str  # "mistral", "llama", "mixtral" or "pixtral"
    text: TextConfig
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    projector_bias: bool = True
    projector_act: str = "gelu"
    dtype: torch.dtype | None = None  # the checkpoint's dtype, from config.json
    quantization: dict | None = field(default=None, compare=False)  # config.json's quantization_config, if any

    @property
    def text_prefix(self) -> str:
        """Pixtral's on-disk legacy Llava layout puts the text model under `language_model.`."""
        return ARCHS[self.arch].text_prefix

    def checkpoint_key(self, name: str) -> str:
        """Our parameter name -> the HF tensor name (`layers.3.mlp.up_proj.weight` -> `model.layers.3...`)."""
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return name
        if name.startswith("lm_head."):
            return self.text_prefix + name
        return f"{self.text_prefix}model.{name}"


def _rope_theta(cfg: dict, default: float, allowed: tuple[str, ...], where: str) -> float:
    """rope_parameters (transformers 5) or rope_theta (4); scaled RoPE variants are refused."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or allowed[0]
    if kind not in allowed:
        raise QuantkitError(f"{where}: RoPE type {kind!r} is not supported (only {', '.join(allowed)})")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(default if theta is None else theta)


def _act(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise QuantkitError(f"{where}: activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return name


def _need(cfg: dict, key: str, where: str):
    if cfg.get(key) is None:
        raise QuantkitError(f"{where} has no {key!r}")
    return cfg[key]


def text_config(cfg: dict, model_type: str, where: str = "config.json") -> TextConfig:
    """Parse a Mistral, Llama or Mixtral text config (top level, or Llava's text_config)."""
    if model_type not in TEXT_DEFAULTS:
        raise QuantkitError(f"{where}: text model type {model_type!r} is not supported ({', '.join(TEXT_DEFAULTS)})")
    d = {**TEXT_DEFAULTS[model_type], **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}
    dim, heads = config_int(d, "hidden_size", where), config_int(d, "num_attention_heads", where)
    if d.get("hidden_act", "silu") != "silu":
        raise QuantkitError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    for bias in ("attention_bias", "mlp_bias"):
        if d.get(bias):
            raise QuantkitError(f"{where}: {bias} is not supported (Mistral's decoder has no linear biases)")
    window = d.get("sliding_window")
    return TextConfig(
        dim=dim,
        n_layers=config_int(d, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=config_int(d, "num_key_value_heads", where, default=heads),
        head_dim=config_int(d, "head_dim", where, default=dim // heads),
        ffn_dim=config_int(d, "intermediate_size", where),
        vocab_size=config_int(d, "vocab_size", where),
        norm_eps=float(d["rms_norm_eps"]),
        rope_theta=_rope_theta(d, d["rope_theta"], ("default",), where),
        max_seq_len=config_int(d, "max_position_embeddings", where),
        sliding_window=int(window) if window is not None else None,
        n_experts=int(d["num_local_experts"]) if model_type == "mixtral" else 0,
        top_k=int(d["num_experts_per_tok"]) if model_type == "mixtral" else 0,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def vision_config(cfg: dict, where: str = "config.json vision_config") -> VisionConfig:
    """Parse a Pixtral vision_config."""
    if cfg.get("model_type", "pixtral") != "pixtral":
        raise QuantkitError(f"{where}: vision model type {cfg['model_type']!r} is not supported (pixtral)")
    return VisionConfig(
        dim=int(cfg.get("hidden_size", 1024)),
        n_layers=int(cfg.get("num_hidden_layers", 24)),
        n_heads=int(cfg.get("num_attention_heads", 16)),
        ffn_dim=int(cfg.get("intermediate_size", 4096)),
        channels=int(cfg.get("num_channels", 3)),
        patch_size=int(cfg.get("patch_size", 16)),
        image_size=int(cfg.get("image_size", 1024)),
        rope_theta=_rope_theta(cfg, 10000.0, ("axial", "default"), where),
        hidden_act=_act(str(cfg.get("hidden_act", "gelu")), where),
    )


def quantization_of(cfg: dict, where: str = "config.json") -> dict | None:
    """A config's quantization_config: None for a float model, refused unless a JSON object."""
    qcfg = cfg.get("quantization_config")
    if qcfg is not None and not isinstance(qcfg, dict):
        raise QuantkitError(f"{where}: quantization_config must be a JSON object, not {type(qcfg).__name__}")
    return qcfg


def parse_config(cfg: dict) -> ModelConfig:
    """config.json contents -> ModelConfig; a one-line error for architectures the runtime does not run."""
    archs = cfg.get("architectures") or []
    arch = next((runtime_arch(a) for a in archs if runtime_arch(a)), None)
    if arch is None:
        arch = next((a.name for a in ARCHS.values() if a.model_type == cfg.get("model_type")), None)
    if arch is None:
        found = ", ".join(archs) or cfg.get("model_type") or "none given"
        known = ", ".join(dict.fromkeys(a.hf_class for a in ARCHS.values()))
        raise QuantkitError(f"config.json: architecture {found} is not supported ({known})")
    dtype = CONFIG_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")))
    qcfg = quantization_of(cfg)
    if not ARCHS[arch].has_vision:
        return ModelConfig(arch=arch, text=text_config(cfg, ARCHS[arch].text_model_type), dtype=dtype,
                           quantization=qcfg)  # fmt: skip
    text = cfg.get("text_config") or {}
    if cfg.get("vision_feature_layer", -1) != -1 or cfg.get("vision_feature_select_strategy", "full") != "full":
        raise QuantkitError("config.json: only vision_feature_layer -1 with strategy 'full' (Pixtral) is supported")
    image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
    return ModelConfig(
        arch=arch,
        text=text_config(text, text.get("model_type", "mistral"), "config.json text_config"),
        vision=vision_config(cfg.get("vision_config") or {}),
        image_token_id=int(_need({"image_token_index": image_token}, "image_token_index", "config.json")),
        projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        projector_act=_act(str(cfg.get("projector_hidden_act", "gelu")), "config.json"),
        dtype=dtype,
        quantization=qcfg,
    )


def load_model_config(folder: Path) -> ModelConfig:
    """Read FOLDER/config.json; a one-line error when it is missing (e.g. a Mistral-native folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        hint = (
            " (a Mistral-native checkpoint: run `quantkit convert` first)" if (folder / "params.json").is_file() else ""
        )
        raise QuantkitError(f"{folder} has no config.json{hint}")
    return parse_config(read_json(path))
