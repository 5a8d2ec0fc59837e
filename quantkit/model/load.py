"""Build the model on the meta device, then fill it from sharded safetensors one part at a time.

Nothing is allocated until a part is loaded, and a part reads only its own tensors (TensorIndex, no mmap). So
the quantizer can load one decoder layer, run it and free it (`Checkpoint.load`, `unload`) and never hold more
than one layer of a 124B model; `load_model` walks every part the same way, placing each on its device. Every
checkpoint tensor must be used and every parameter found (nanoGPT-style strict accounting), checked on the headers
before any weight is read. A folder may name its tensors either as `convert` writes them (the legacy HF layout our
module names mirror) or as quantized exports do (current loaders' names, quantkit.arch `export_names`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quantkit.arch import export_name
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import hf_weight_files
from quantkit.io.reader import TensorIndex
from quantkit.model.config import CONFIG_DTYPES, ModelConfig, load_model_config
from quantkit.model.text import Transformer

GPU_HEADROOM = 0.9  # fraction of free GPU memory given to weights; the rest is for the KV cache and activations


class Checkpoint:
    """A converted (HF-layout) model folder: its ModelConfig and a lazy index of its tensors."""

    def __init__(self, folder: Path, config: ModelConfig | None = None):
        self.folder = Path(folder)
        self.config: ModelConfig = config or load_model_config(self.folder)
        self.index = TensorIndex(hf_weight_files(self.folder))
        # Current names unless some tensor has a legacy name; a folder mixing both is then refused by `unused`.
        arch = self.config.arch
        self.current_names = all(export_name(arch, k) == k for k in self.index.infos)

    def key(self, name: str) -> str:
        """Our parameter name -> this folder's tensor name, in whichever layout the folder uses."""
        key = self.config.checkpoint_key(name)
        return export_name(self.config.arch, key) if self.current_names else key

    def source(self, name: str) -> str:
        """The tensor that holds parameter `name`: its key, except that with tied embeddings and no
        lm_head.weight on disk (a 16-bit head) the head reads the embedding matrix."""
        tied = self.config.text.tie_word_embeddings
        if name == "lm_head.weight" and tied and self.key(name) not in self.index.infos:
            return self.key("embed_tokens.weight")
        return self.key(name)

    def load(self, model: nn.Module, name: str = "", device: torch.device | str = "cpu", dtype=None) -> nn.Module:
        """Materialize submodule `name` of model (e.g. "layers.3", "" for all) from disk on device; returns it.

        Parameters are cast to dtype when given; buffers keep their stored dtype (a quantized linear's fp16 scales
        and integer codes are data, not weights to convert). Shapes must match what config.json implies.
        """
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        state = {}
        for pname, current in module.state_dict(keep_vars=True).items():
            key = self.source(prefix + pname)
            info = self.index.infos.get(key)
            if info is None:
                raise QuantkitError(f"{self.folder.name}: tensor {key} is missing from the checkpoint")
            if tuple(info.shape) != tuple(current.shape):
                raise QuantkitError(
                    f"{self.folder.name}: {key} has shape {list(info.shape)}, config.json implies {list(current.shape)}"
                )
            t = self.index.get(key)
            cast = dtype is not None and isinstance(current, nn.Parameter) and t.is_floating_point()
            state[pname] = t.to(device=device, dtype=dtype if cast else None)
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def unused(self, model: nn.Module) -> list[str]:
        """Checkpoint tensors that no parameter of model maps to."""
        used = {self.source(n) for n in model.state_dict(keep_vars=True)}
        return sorted(k for k in self.index.infos if k not in used)

    def missing(self, model: nn.Module) -> list[str]:
        """Tensors that model needs and the checkpoint lacks."""
        return sorted(k for n in model.state_dict(keep_vars=True) if (k := self.source(n)) not in self.index.infos)


def name_list(names: list[str]) -> str:
    """The first three names and how many more, for one-line errors."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def unload(module: nn.Module) -> None:
    """Free a loaded part (e.g. a decoder layer after the quantizer is done with it): back to the meta device."""
    module.to("meta")


def build_model(config: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """The model with no weights (meta device, free for any size); parameters never require grad."""
    with torch.device(device):
        model = Transformer(config)
    return model.requires_grad_(False).eval()


def model_parts(model: Transformer) -> list[str]:
    """Loadable parts in forward order: embeddings, vision tower and projector, each decoder layer, norm, head."""
    parts = ["embed_tokens"]
    if model.vision_tower is not None:
        parts += ["vision_tower", "multi_modal_projector"]
    return parts + [f"layers.{i}" for i in range(len(model.layers))] + ["norm", "lm_head"]


def parse_devices(spec: str) -> list[torch.device]:
    """`cpu`, `cuda`, `cuda:N`, a comma-separated list, or `auto` (every GPU, else the CPU)."""
    spec = spec.strip().lower()
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(n)] or [torch.device("cpu")]
    devices = []
    for part in spec.split(","):
        try:
            d = torch.device(part.strip())
        except RuntimeError:
            raise QuantkitError(
                f"unknown device {part!r} (cpu, cuda, cuda:N, a list like cuda:0,cuda:1, or auto)"
            ) from None
        if d.type == "cuda":
            if not torch.cuda.is_available():
                raise QuantkitError(f"device {part} requested but CUDA is not available here (use --device cpu)")
            d = torch.device("cuda", d.index or 0)
            if d.index >= torch.cuda.device_count():
                raise QuantkitError(f"device {part} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        elif d.type != "cpu":
            raise QuantkitError(f"device type {d.type} is not supported (cpu or cuda)")
        devices.append(d)
    return devices


def resolve_dtype(name: str | None, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on GPU; float32 on CPU, where bf16/fp16 matmuls are slow on most machines."""
    if name in (None, "auto"):
        return (config.dtype or torch.bfloat16) if device.type == "cuda" else torch.float32
    if name not in CONFIG_DTYPES:
        raise QuantkitError(f"unknown dtype {name!r} ({', '.join(CONFIG_DTYPES)} or auto)")
    return CONFIG_DTYPES[name]


def part_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes a (meta) part will take once loaded: parameters in dtype, buffers in their own dtype (as load casts)."""
    size = torch.empty((), dtype=dtype).element_size()
    tensors = module.state_dict(keep_vars=True).values()
    return sum(
        t.numel() * (size if isinstance(t, nn.Parameter) and t.is_floating_point() else t.element_size())
        for t in tensors
    )


def split_by_memory(sizes: list[int], free: list[int]) -> list[int]:
    """Device index for each of consecutive parts, shares proportional to free memory (each part where its
    middle falls), so every GPU keeps the same fraction of headroom for its KV cache."""
    total, capacity = sum(sizes), sum(free)
    if total > capacity:
        raise QuantkitError(f"the model needs {total / 1e9:.1f} GB but the GPUs have {capacity / 1e9:.1f} GB free")
    out, done, d, bound = [], 0, 0, free[0] / capacity * total
    for s in sizes:
        while d < len(free) - 1 and done + s / 2 > bound:
            d += 1
            bound += free[d] / capacity * total
        out.append(d)
        done += s
    return out


def place_parts(model: Transformer, devices: list[torch.device], dtype: torch.dtype) -> dict[str, torch.device]:
    """Which device each part goes to: one device takes all; several GPUs split layers by free memory."""
    parts = model_parts(model)
    sizes = [part_bytes(model.get_submodule(p), dtype) for p in parts]
    if devices[0].type == "cpu":
        return dict.fromkeys(parts, devices[0])
    free = [int(torch.cuda.mem_get_info(d)[0] * GPU_HEADROOM) for d in devices]
    if len(devices) == 1 and sum(sizes) > free[0]:
        raise QuantkitError(
            f"the model needs {sum(sizes) / 1e9:.1f} GB but {devices[0]} has {free[0] / 1e9:.1f} GB free"
        )
    return {p: devices[i] for p, i in zip(parts, split_by_memory(sizes, free), strict=True)}


def load_model(
    folder: Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    progress: bool = True,
    prepare: Callable[[Transformer, Checkpoint], None] | None = None,
    config: ModelConfig | None = None,
) -> Transformer:
    """Load a converted model folder, part by part, onto `device` (see parse_devices) in `dtype`.

    `prepare(model, checkpoint)` runs on the empty meta model before any weight is read: the hook where later
    code swaps linears (swap_linears) for quantized ones whose tensors the checkpoint holds. `config`: the folder's
    config when the caller has parsed it already (config.json is read once on the way to a running model).
    """
    ckpt = Checkpoint(folder, config)
    devices = parse_devices(device)
    if not isinstance(dtype, torch.dtype):
        dtype = resolve_dtype(dtype, ckpt.config, devices[0])
    model = build_model(ckpt.config)
    if prepare is not None:
        prepare(model, ckpt)
    unused = ckpt.unused(model)
    if unused:
        raise QuantkitError(f"{ckpt.folder.name}: tensors the model does not use: {name_list(unused)}")
    missing = ckpt.missing(model)
    if missing:
        raise QuantkitError(f"{ckpt.folder.name}: tensors missing from the checkpoint: {name_list(missing)}")
    placement = place_parts(model, devices, dtype)
    sizes = {p: part_bytes(model.get_submodule(p), dtype) for p in placement}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for part, part_device in placement.items():
            ckpt.load(model, part, part_device, dtype)
            bar.update(sizes[part])
    return model
