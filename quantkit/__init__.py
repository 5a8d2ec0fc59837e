"""quantkit: Mistral-native checkpoints -> Hugging Face layout -> quantized models that run on one GPU."""

__version__ = "0.1.0"
