"""Architectures as data: tensor-name tables, shapes and config fields (mistral.py), and what the quantizer
knows of a layer (blocks.py), used by one generic engine."""

from quantkit.arch.mistral import (
    ARCHS,
    TEXT_DEFAULTS,
    Arch,
    Entry,
    config_int,
    detect_arch,
    export_name,
    model_dims,
    register,
    runtime_arch,
)

__all__ = [
    "ARCHS",
    "TEXT_DEFAULTS",
    "Arch",
    "Entry",
    "config_int",
    "detect_arch",
    "export_name",
    "model_dims",
    "register",
    "runtime_arch",
]
