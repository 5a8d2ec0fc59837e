"""The runtime model: one plain-PyTorch definition of Mistral, Mixtral and Pixtral, loading the HF layout."""

from quantkit.model.config import ModelConfig, TextConfig, VisionConfig, load_model_config
from quantkit.model.generate import Generation, generate, sample
from quantkit.model.load import Checkpoint, build_model, load_model, unload
from quantkit.model.modules import swap_linears
from quantkit.model.text import LayerContext, Transformer

__all__ = [
    "Checkpoint",
    "Generation",
    "LayerContext",
    "ModelConfig",
    "TextConfig",
    "Transformer",
    "VisionConfig",
    "build_model",
    "generate",
    "load_model_config",
    "load_model",
    "sample",
    "swap_linears",
    "unload",
]
