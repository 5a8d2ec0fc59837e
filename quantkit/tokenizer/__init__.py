"""Tokenizers: reading Mistral's tokenizer files, converting them to the HF layout, chat templates, images."""
