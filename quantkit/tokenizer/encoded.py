"""What a tokenizer gives the runtime for a prompt: the ids, the images in prompt order, and the prompt as text.

Its own module because both tokenizers (chat.py for Mistral-native files, hub.py for tokenizer.json folders)
return it and chat.py chooses between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    input_ids: list[int]
    images: list[torch.Tensor]  # [3, H, W] float32 each, in prompt order
    text: str  # the prompt with special tokens visible; each image shows as one [IMG], as in the HF template
