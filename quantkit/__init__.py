"""quantkit: Mistral-native checkpoints -> Hugging Face layout -> quantized models that run on one GPU."""

import time

__version__ = "0.1.0"
STARTED = time.perf_counter()  # when this process first imported quantkit (--dry-run counts the import cost)
