"""Architectures as data: tensor-name tables, shapes and config fields, used by one generic engine."""

from quantkit.arch.mistral import ARCHS, CAPTURE_GROUPS, Arch, Entry, detect_arch, export_name, model_dims

__all__ = ["ARCHS", "CAPTURE_GROUPS", "Arch", "Entry", "detect_arch", "export_name", "model_dims"]
