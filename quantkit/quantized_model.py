"""Quantized model folders in the runtime: the bridge between quantkit.model and the packed kernels.

quantkit.model imports no quantization code; instead load_model's `prepare` hook runs here on the empty meta model
and swaps every linear whose checkpoint holds quantized tensors for the module its output format builds (formats/:
a QuantLinear, or the GPTQ tensors as stored) with buffers shaped from the safetensors headers alone. Checkpoint.load
then fills them part by part like any other module, so a 124B model never needs more than one part in memory at once;
then `repack` runs the format's explicit step per linear (GPTQ tensors -> QuantLinear).

Before any weight is read, a folder is refused (naming the tensors) when it holds quantized tensors that no linear of
the model takes, or a linear with neither quantized tensors nor a 16-bit weight: the two ways a loader that matches
names loosely ends up with randomly initialized layers (transformers 5 with a GPTQ Mixtral's experts).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import config_format
from quantkit.io.checkpoint import read_json
from quantkit.io.reader import DTYPES, TensorInfo
from quantkit.kernels import check_backend, resolve_backend
from quantkit.kernels.exl3_linear import Exl3Linear
from quantkit.kernels.qlinear import INT4_DTYPE, QuantLinear
from quantkit.model.config import ModelConfig, load_model_config, quantization_of
from quantkit.model.load import Checkpoint, load_model, name_list, parse_devices
from quantkit.model.modules import swap_linears
from quantkit.model.text import Transformer

DENSE_FRACTION = 0.5  # share of available memory the dequantized weights of the torch backend may take


def quantization_config(folder: Path) -> dict | None:
    """config.json's quantization_config, None for a float folder (or one without config.json)."""
    path = Path(folder) / "config.json"
    return quantization_of(read_json(path), str(path)) if path.is_file() else None


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


def _packed_module(
    fmt: OutputFormat, qcfg: dict, backend: str, prefix: str, infos: dict[str, TensorInfo], index,
    shape: tuple[int, int] | None = None,
) -> nn.Module | None:
    """The quantized linear stored under prefix, built on the meta device (only the format's header tensors are
    read), which checks every packed tensor's shape; None when prefix holds no tensors of the format."""
    if fmt.key_tensor not in infos:
        return None
    tensors = {k: index.get(f"{prefix}.{k}") if k in fmt.header_tensors else _meta(i) for k, i in infos.items()}
    try:
        return fmt.linear(qcfg, prefix, tensors, backend, shape)
    except QuantkitError as e:
        raise QuantkitError(e.args[0] if e.args[0].startswith(prefix) else f"{prefix}: {e}") from None


def check_packed(qcfg: dict, index) -> None:
    """Refuse a checkpoint whose packed tensors do not fit their headers (what loading it would refuse)."""
    quantized_prepare(qcfg, "torch")  # the method and its settings
    fmt = config_format(qcfg)
    for prefix, infos in _by_prefix(index.infos).items():
        _packed_module(fmt, qcfg, "torch", prefix, infos, index)


def quantized_prepare(qcfg: dict, backend: str = "auto") -> Callable[[Transformer, Checkpoint], None]:
    """The load_model prepare hook for a folder with this quantization_config (refused here when unsupported)."""
    fmt = config_format(qcfg)
    fmt.check_config(qcfg)
    check_backend(backend)

    def prepare(model: Transformer, ckpt: Checkpoint) -> None:
        groups = _by_prefix(ckpt.index.infos)
        taken: set[str] = set()
        bare: list[str] = []

        def factory(name: str, linear: nn.Linear) -> nn.Module | None:
            prefix = ckpt.key(f"{name}.weight").removesuffix(".weight")
            infos = groups.get(prefix, {})
            taken.add(prefix)
            if ckpt.source(f"{name}.weight") not in ckpt.index.infos and not infos.keys() & fmt.markers:
                bare.append(prefix)
            shape = (linear.out_features, linear.in_features)
            module = _packed_module(fmt, qcfg, backend, prefix, infos, ckpt.index, shape)
            if module is not None:
                _check_shape(prefix, module, linear)
            return module

        swapped = swap_linears(model, factory)
        stray = sorted(p for p, parts in groups.items() if parts.keys() & fmt.markers and p not in taken)
        if stray:
            raise QuantkitError(
                f"{ckpt.folder.name}: quantized tensors for modules a {ckpt.config.arch} model does not have: "
                f"{name_list(stray)} (refusing to leave the layers they were meant for uninitialized)"
            )
        if bare:
            raise QuantkitError(
                f"{ckpt.folder.name}: linears with neither quantized tensors nor a 16-bit weight in the checkpoint: "
                f"{name_list(bare)}"
            )
        if swapped == 0:
            raise QuantkitError(
                f"{ckpt.folder.name}: config.json says quant_method {fmt.name!r} but no quantized layer was found "
                "in the checkpoint (refusing to run unquantized random weights)"
            )

    return prepare


def load_quantized(
    folder: Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    backend: str = "auto",
    progress=True,
    keep_dense: bool = True,
    fuse: bool = True,
    config: ModelConfig | None = None,
) -> Transformer:
    """Load a quantized folder (quantkit or GPTQ format) part by part; linears run on `backend` (auto/triton/torch).

    keep_dense: linears on the torch backend keep their dequantized weight while it fits (see keep_dequantized).
    fuse: q/k/v and gate/up run as one matmul each where their packed layouts match (see fuse_projections).
    A bf16 model on CPU decodes its 4-bit linears on aten's int4 kernel (see pack_int4).
    """
    config = config or load_model_config(folder)
    qcfg = config.quantization
    if not qcfg:
        raise QuantkitError(f"{Path(folder).name}: config.json has no quantization_config (not a quantized model)")
    prepare = quantized_prepare(qcfg, backend)
    resolve_backend(backend, parse_devices(device)[0])  # a Triton request that cannot run fails before loading
    model = load_model(folder, device=device, dtype=dtype, progress=progress, prepare=prepare, config=config)
    repack(model, config_format(qcfg), backend)
    set_backend(model, backend)
    if fuse:
        fuse_projections(model)
    pack_int4(model)
    if keep_dense:
        keep_dequantized(model)
    return model


def load_any(
    folder: Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    backend: str = "auto",
    progress=True,
    keep_dense: bool = True,
    fuse: bool = True,
    config: ModelConfig | None = None,
) -> Transformer:
    """A float folder through load_model, a quantized one through load_quantized (config: as parsed already)."""
    config = config or load_model_config(folder)
    if config.quantization:
        return load_quantized(folder, device, dtype, backend, progress, keep_dense, fuse, config)
    return load_model(folder, device=device, dtype=dtype, progress=progress, config=config)


def repack(model: nn.Module, fmt: OutputFormat, backend: str) -> int:
    """The format's step after loading (OutputFormat.repack), one module at a time so that only one linear is ever
    held in both forms; returns how many modules it replaced."""
    replaced = 0
    for name in [n for n, _ in model.named_modules() if n]:
        module = model.get_submodule(name)
        new = fmt.repack(module, backend)
        if new is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            replaced += 1
    return replaced


def set_backend(model: nn.Module, backend: str) -> int:
    """Switch every quantized linear of a loaded model to backend, resolved once here; returns how many there are."""
    check_backend(backend)
    linears = [m for m in model.modules() if isinstance(m, (QuantLinear, Exl3Linear))]
    for m in linears:
        m.set_backend(backend)
    return len(linears)


def fuse_projections(model: nn.Module) -> int:
    """Join each layer's q/k/v and gate/up QuantLinears into one each where their layouts match (one kernel launch
    instead of three / two per decoded token); returns how many groups were joined. The parts are dropped, so the
    packed weights are not held twice; a model fused this way is for running, not for saving."""
    from quantkit.arch.blocks import block_kind
    from quantkit.kernels.qlinear import fuse

    joined = 0
    groups = [(layer.get_submodule(parent), parts, target) for layer in model.modules() if hasattr(layer, "kind")
              for parent, parts, target in block_kind(layer).fused]  # fmt: skip
    for mod, names, target in groups:
        if getattr(mod, target) is not None or any(getattr(mod, n) is None for n in names):
            continue
        fused = fuse([getattr(mod, n) for n in names])
        if fused is None:
            continue
        setattr(mod, target, fused)
        for n in names:
            setattr(mod, n, None)
        joined += 1
    return joined


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on device: free GPU memory, or the kernel's MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pack_int4(model: nn.Module, enabled: bool = True) -> int:
    """In a bf16 model, let 4-bit torch-backend linears on the CPU keep the repack of aten's int4 kernel
    (QuantLinear.keep_int4), which decode steps read instead of a kept bf16 weight: decoding is memory-bound there,
    and the repack is a quarter of its size. Returns how many keep one; enabled=False drops them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.keep_int4(enabled and dtype == INT4_DTYPE) for m in linears)


def keep_dequantized(model: nn.Module, enabled: bool = True, fraction: float = DENSE_FRACTION) -> int:
    """Let quantized linears on the torch backend keep their dequantized weight, in the model's dtype, while the
    total stays within `fraction` of the memory available on their device; returns how many keep one.

    The torch backend otherwise dequantizes every weight on every forward, which makes a quantized model decode
    several times slower than its float original on CPU. enabled=False drops every kept weight.
    """
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    room: dict[torch.device, int] = {}
    kept = 0
    for m in linears:
        if not enabled or m.resolved_backend != "torch":
            m.keep_dense(None)
            continue
        device = m.scales.device
        if device not in room:
            room[device] = int(available_memory(device) * fraction)
        size = m.dense_bytes(dtype)
        if size > room[device]:
            m.keep_dense(None)
            continue
        m.keep_dense(dtype)
        room[device] -= size
        kept += 1
    return kept
