"""Quantized model folders in the runtime: the bridge between quantkit.model and the packed kernels.

quantkit.model imports no quantization code; instead load_model's `prepare` hook runs here on the empty meta model
and swaps every linear whose checkpoint holds quantized tensors for a QuantLinear (quantkit format) or a GPTQLinear
(GPTQ format, repacked as it loads) whose buffers are shaped from the safetensors headers alone. Checkpoint.load then
fills them part by part like any other module, so a 124B model never needs more than one part in memory at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.packed import FORMAT_VERSION
from quantkit.io.checkpoint import read_json
from quantkit.io.reader import DTYPES, TensorInfo
from quantkit.kernels import BACKENDS, resolve_backend
from quantkit.kernels.qlinear import GPTQLinear, QuantLinear
from quantkit.model.load import Checkpoint, load_model, parse_devices
from quantkit.model.modules import swap_linears
from quantkit.model.text import Transformer
from quantkit.quant.pack import GPTQ_BITS, GPTQ_FORMATS

QUANT_METHODS = ("gptq", "quantkit")
HEADER_SUFFIXES = ("qmeta", "segments")  # tiny tensors read at prepare time: they say how to shape the rest


def quantization_config(folder: Path) -> dict | None:
    """config.json's quantization_config, None for a float folder (or one without config.json)."""
    path = Path(folder) / "config.json"
    qcfg = read_json(path).get("quantization_config") if path.is_file() else None
    if qcfg is not None and not isinstance(qcfg, dict):
        raise QuantkitError(f"{path}: quantization_config must be a JSON object, not {type(qcfg).__name__}")
    return qcfg


def _by_prefix(infos: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Checkpoint tensors grouped by module: `a.b.q_proj.qmeta` -> {"a.b.q_proj": {"qmeta": info}}."""
    groups: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    for key, info in infos.items():
        prefix, _, suffix = key.rpartition(".")
        groups[prefix][suffix] = info
    return groups


def _meta(info: TensorInfo) -> torch.Tensor:
    return torch.empty(info.shape, dtype=DTYPES[info.dtype], device="meta")


def _check_shape(name: str, module: nn.Module, linear: nn.Linear) -> None:
    if (module.in_features, module.out_features) != (linear.in_features, linear.out_features):
        raise QuantkitError(
            f"{name}: quantized tensors are for a [{module.out_features}, {module.in_features}] linear, "
            f"config.json implies [{linear.out_features}, {linear.in_features}]"
        )


def _packed_module(qcfg: dict, backend: str, prefix: str, infos: dict[str, TensorInfo], index) -> nn.Module | None:
    """The quantized linear stored under prefix, built on the meta device (only header tensors are read), which
    checks every packed tensor's shape; None when prefix holds no packed tensors of qcfg's method."""
    method = qcfg.get("quant_method")
    if method == "quantkit" and "qmeta" in infos:
        tensors = {k: index.get(f"{prefix}.{k}") if k in HEADER_SUFFIXES else _meta(i) for k, i in infos.items()}
        try:
            return QuantLinear.from_tensors("", tensors, backend=backend)
        except QuantkitError as e:
            raise QuantkitError(f"{prefix}: {e}") from None
    if method == "gptq" and "qweight" in infos:
        tensors = {k: _meta(i) for k, i in infos.items()}
        fmt = qcfg.get("checkpoint_format", "gptq")
        return GPTQLinear(tensors, int(qcfg["bits"]), bool(qcfg.get("sym", True)), fmt, backend, prefix)
    return None


def check_packed(qcfg: dict, index) -> None:
    """Refuse a checkpoint whose packed tensors do not fit their headers (what loading it would refuse)."""
    quantized_prepare(qcfg, "torch")  # the method and its settings
    for prefix, infos in _by_prefix(index.infos).items():
        _packed_module(qcfg, "torch", prefix, infos, index)


def quantized_prepare(qcfg: dict, backend: str = "auto") -> Callable[[Transformer, Checkpoint], None]:
    """The load_model prepare hook for a folder with this quantization_config (refused here when unsupported)."""
    method = qcfg.get("quant_method")
    if method not in QUANT_METHODS:
        raise QuantkitError(f"quantization method {method!r} is not supported ({', '.join(QUANT_METHODS)})")
    if method == "quantkit" and qcfg.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise QuantkitError(f"quantkit format version {qcfg['format_version']} is not supported ({FORMAT_VERSION})")
    if method == "gptq" and (
        qcfg.get("bits") not in GPTQ_BITS or qcfg.get("checkpoint_format", "gptq") not in GPTQ_FORMATS
    ):
        raise QuantkitError(
            f"GPTQ bits {qcfg.get('bits')} / checkpoint_format {qcfg.get('checkpoint_format')!r} are not supported "
            f"(bits {', '.join(map(str, GPTQ_BITS))}; format {' or '.join(GPTQ_FORMATS)})"
        )
    if backend not in BACKENDS:
        raise QuantkitError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")

    def prepare(model: Transformer, ckpt: Checkpoint) -> None:
        groups = _by_prefix(ckpt.index.infos)

        def factory(name: str, linear: nn.Linear) -> nn.Module | None:
            prefix = ckpt.config.checkpoint_key(f"{name}.weight").removesuffix(".weight")
            module = _packed_module(qcfg, backend, prefix, groups.get(prefix, {}), ckpt.index)
            if module is not None:
                _check_shape(prefix, module, linear)
            return module

        if swap_linears(model, factory) == 0:
            raise QuantkitError(
                f"{ckpt.folder.name}: config.json says quant_method {method!r} but no quantized layer was found "
                "in the checkpoint (refusing to run unquantized random weights)"
            )

    return prepare


def load_quantized(
    folder: Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto", backend: str = "auto", progress=True
) -> Transformer:
    """Load a quantized folder (quantkit or GPTQ format) part by part; linears run on `backend` (auto/triton/torch)."""
    qcfg = quantization_config(folder)
    if not qcfg:
        raise QuantkitError(f"{Path(folder).name}: config.json has no quantization_config (not a quantized model)")
    prepare = quantized_prepare(qcfg, backend)
    resolve_backend(backend, parse_devices(device)[0])  # a Triton request that cannot run fails before loading
    return load_model(folder, device=device, dtype=dtype, progress=progress, prepare=prepare)


def load_any(
    folder: Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto", backend: str = "auto", progress=True
) -> Transformer:
    """A float folder through load_model, a quantized one through load_quantized."""
    if quantization_config(folder):
        return load_quantized(folder, device, dtype, backend, progress)
    return load_model(folder, device=device, dtype=dtype, progress=progress)


def set_backend(model: nn.Module, backend: str) -> int:
    """Switch every quantized linear of a loaded model to backend; returns how many there are."""
    if backend not in BACKENDS:
        raise QuantkitError(f"unknown backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in linears:
        m.backend = backend
    return len(linears)
