"""Mistral-native -> Hugging Face: checkpoint reader -> key map -> transforms -> config -> writer."""
