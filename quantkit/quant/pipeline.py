"""`quantkit quantize`: calibration rows -> embeddings -> one decoder layer at a time -> head -> packed output.

Only one decoder layer's weights are ever loaded (the model is built on the meta device and each layer is
materialized from the checkpoint, quantized, saved and freed), and hidden states live in the job's row stores on
disk, read one row at a time; so a 124B model needs one layer plus its Hessians in memory. The job (work dir)
makes the run resumable: rerun the same command after a crash and it continues at the last finished layer.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit.calib.rows import build_rows
from quantkit.calib.sources import load_calibration
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import HF_INDEX, read_json
from quantkit.io.reader import TensorInfo, load_tensor, read_header
from quantkit.io.writer import (
    OutputFolder,
    TensorSpec,
    parse_size,
    plan_shards,
    shard_names,
    write_index,
    write_json,
    write_shard,
)
from quantkit.model.load import Checkpoint, build_model, unload
from quantkit.quant.capture import QuantSettings, capture_groups, quantize_layer
from quantkit.quant.export import FORMATS, linear_tensors, model_card, quantization_config
from quantkit.quant.gptq import HessianAccumulator, gptq_quantize
from quantkit.quant.job import Job
from quantkit.tokenizer.chat import ChatTokenizer

GROUP_SIZES = (32, 64, 128, None)
GPTQ_FORMAT_BITS = (2, 3, 4, 8)


@dataclass
class QuantPlan:
    """The --dry-run answer: what will be quantized, the output size, and the memory the run needs."""

    layers: int
    quantized_params: int
    kept_params: int
    output_bytes: int
    peak_ram_bytes: int
    peak_device_bytes: int
    device: str

    def summary(self) -> str:
        return "\n".join(
            [
                f"decoder layers: {self.layers}",
                f"quantized parameters: {self.quantized_params:,}; kept 16-bit: {self.kept_params:,}",
                f"output size: {self.output_bytes / 1e9:.2f} GB",
                f"peak memory: {self.peak_ram_bytes / 1e9:.2f} GB RAM"
                + (f", {self.peak_device_bytes / 1e9:.2f} GB on {self.device}" if self.device != "cpu" else ""),
            ]
        )


def _linear_shapes(model, layer_idx: int) -> dict[str, tuple[int, int]]:
    layer = model.layers[layer_idx]
    return {n: tuple(layer.get_submodule(n).weight.shape) for g in capture_groups(layer) for n in g}


def _check_settings(model, s: QuantSettings, fmt: str, head_bits: int | None) -> None:
    if fmt not in FORMATS:
        raise QuantkitError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if not (isinstance(s.bits, int) and 2 <= s.bits <= 8):
        raise QuantkitError(f"--bits must be between 2 and 8, got {s.bits}")
    if fmt == "gptq" and s.bits not in GPTQ_FORMAT_BITS:
        raise QuantkitError(f"the GPTQ format stores 2, 3, 4 or 8 bits, not {s.bits}")
    if head_bits is not None and not 2 <= head_bits <= 8:
        raise QuantkitError(f"--head-bits must be between 2 and 8, got {head_bits}")
    if s.group_size not in GROUP_SIZES:
        raise QuantkitError(f"--group-size must be 32, 64, 128 or none, got {s.group_size}")
    shapes = _linear_shapes(model, 0)
    if head_bits is not None:
        shapes["lm_head"] = tuple(model.lm_head.weight.shape)
    for name, (out_f, in_f) in shapes.items():
        if s.group_size and in_f % s.group_size:
            raise QuantkitError(f"--group-size {s.group_size} does not divide {name}'s {in_f} input features")
        if fmt == "gptq" and (in_f % 32 or out_f % 32):
            raise QuantkitError(f"the GPTQ format needs features divisible by 32; {name} is [{out_f}, {in_f}]")


def plan(ckpt: Checkpoint, model, s: QuantSettings, head_bits: int | None, rows: int, seq_len: int, device: str):
    """Sizes and peak memory from the config alone."""
    t = ckpt.config.text
    shapes = _linear_shapes(model, 0)
    per_layer = sum(o * i for o, i in shapes.values())
    quantized = per_layer * t.n_layers + (t.vocab_size * t.dim if head_bits else 0)
    kept = sum(info.numel for info in ckpt.index.infos.values()) - quantized
    groups = lambda i: i // (s.group_size or i)  # noqa: E731
    packed = sum(o * i * s.bits / 8 + groups(i) * o * (2 + s.bits / 8) + 4 * i for o, i in shapes.values())
    head = (t.vocab_size * t.dim * head_bits / 8 + groups(t.dim) * t.vocab_size * 2.5) if head_bits else 0
    output = int(packed * t.n_layers + head + kept * 2)
    largest_in = max(i for _, i in shapes.values())
    layer_bytes = per_layer * 4  # fp32 working copy
    work = 2 * layer_bytes + 3 * largest_in**2 * 4 + 2 * seq_len * max(t.ffn_dim, t.dim) * 4 * 4
    ram_base = 1_000_000_000
    if device == "cpu":
        return QuantPlan(t.n_layers, quantized, kept, output, ram_base + work, 0, device)
    return QuantPlan(t.n_layers, quantized, kept, output, ram_base + layer_bytes, work, device)


def _source_fingerprint(ckpt: Checkpoint) -> str:
    h = hashlib.sha256((ckpt.folder / "config.json").read_bytes())
    for name, info in sorted(ckpt.index.infos.items()):
        h.update(f"{name}:{info.dtype}:{info.shape}:{info.file.name}:{info.file.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _calibration(ckpt: Checkpoint, dataset, split, text_field, rows, seq_len, seed):
    tok = ChatTokenizer.from_folder(ckpt.folder)
    calib = load_calibration(dataset, split=split, text_field=text_field)
    return build_rows(
        calib,
        encode=lambda text: [tok.bos_id, *tok.encode_text(text)],
        rows=rows,
        seq_len=seq_len,
        seed=seed,
        encode_chat=lambda messages, tools: tok.encode_chat(messages, tools).input_ids,
    )


def _prefix(ckpt: Checkpoint, model_name: str) -> str:
    return ckpt.config.checkpoint_key(model_name + ".weight").removesuffix(".weight")


def quantize(
    src: Path,
    dst: Path,
    *,
    settings: QuantSettings,
    fmt: str = "gptq",
    head_bits: int | None = None,
    dataset: str | None = None,
    split: str = "train",
    text_field: str = "text",
    rows: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    work_dir: Path | None = None,
    restart: bool = False,
    force: bool = False,
    dry_run: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuantPlan:
    """Quantize the HF-layout model in src with GPTQ into dst (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise QuantkitError(f"no config.json in {src}: quantize takes a converted (Hugging Face layout) folder")
    ckpt = Checkpoint(src)
    model = build_model(ckpt.config)
    _check_settings(model, settings, fmt, head_bits)
    the_plan = plan(ckpt, model, settings, head_bits, rows, seq_len, device)
    if dry_run:
        return the_plan
    output = OutputFolder(dst, force=force, src=src)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype or ("float32" if device == "cpu" else "bfloat16")
    ]
    crows = _calibration(ckpt, dataset, split, text_field, rows, seq_len, seed)
    ids = crows.ids  # [rows, seq_len]
    job_settings = {
        "source": _source_fingerprint(ckpt),
        "format": fmt,
        "head_bits": head_bits,
        "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "dtype": str(torch_dtype),
        **asdict(settings),
    }
    job = Job(work_dir or dst.parent / f".{dst.name}.quantkit-work", job_settings, restart=restart)
    n_layers, dim = ckpt.config.text.n_layers, ckpt.config.text.dim
    row_shape = (1, seq_len, dim)
    if job.done > 0:
        log(f"resuming at layer {job.done}/{n_layers} (work dir {job.dir}; --restart discards it)")

    if job.done < 0:
        _, nxt = job.stores(rows, row_shape, torch_dtype)
        ckpt.load(model, "embed_tokens", device, torch_dtype)
        with torch.no_grad():
            for r in range(rows):
                nxt.write(r, model.embed(ids[r : r + 1]))
        unload(model.embed_tokens)
        job.finish(0)

    bar = tqdm(total=n_layers, initial=job.done, desc="quantize", unit="layer", disable=not progress)
    with bar:
        for i in range(job.done, n_layers):
            t0 = time.perf_counter()
            cur, nxt = job.stores(rows, row_shape, torch_dtype)
            layer = ckpt.load(model, f"layers.{i}", device, torch_dtype)
            ctx = model.context(0, torch.empty(row_shape, dtype=torch_dtype, device=device))
            tensors: dict[str, torch.Tensor] = {}

            def emit(name: str, res, i=i, tensors=tensors) -> None:
                prefix = _prefix(ckpt, f"layers.{i}.{name}")
                tensors.update({f"{prefix}.{k}": t for k, t in linear_tensors(fmt, res).items()})

            report = quantize_layer(
                layer, rows, lambda r, cur=cur: cur.read(r).to(device), nxt.read, nxt.write, ctx, settings, emit
            )  # fmt: skip
            info = {"bits": settings.bits, "rel_error": report.rel_error, "starved_experts": report.starved}
            job.finish(i + 1, tensors, info)
            unload(layer)
            bar.update(1)
            msg = f"layer {i + 1}/{n_layers}: {settings.bits} bits, rel. output error {report.rel_error:.4f}"
            if report.starved:
                msg += f", {len(report.starved)} expert linears with few tokens used the shared Hessian"
            tqdm.write(f"{msg} ({time.perf_counter() - t0:.1f} s)") if progress else log(msg)

    if head_bits is not None and job.done == n_layers:
        cur, _ = job.stores(rows, row_shape, torch_dtype)
        ckpt.load(model, "norm", device, torch_dtype)
        ckpt.load(model, "lm_head", device, torch_dtype)
        acc = HessianAccumulator(dim, device=device)
        with torch.no_grad():
            for r in range(rows):
                acc.add(model.norm(cur.read(r).to(device)))
        res = gptq_quantize(
            model.lm_head.weight.data, acc.hessian(), head_bits, settings.group_size, sym=settings.sym,
            act_order=settings.act_order, static_groups=settings.static_groups, damp=settings.damp, clip=settings.clip,
        )  # fmt: skip
        tensors = {f"{_prefix(ckpt, 'lm_head')}.{k}": t for k, t in linear_tensors(fmt, res).items()}
        job.finish(n_layers + 1, tensors, {"bits": head_bits, "rel_loss": res.rel_loss})
        unload(model.lm_head)
        unload(model.norm)

    qcfg = quantization_config(fmt, settings, crows.provenance, head_bits)
    size = _assemble(ckpt, job, output, qcfg, max_shard_size, progress)
    card = model_card(dst.name, fmt, settings, crows.provenance, size, head_bits)
    (dst / "README.md").write_text(card)
    log(f"wrote {dst} ({size / 1e9:.3f} GB)")
    return the_plan


def _assemble(ckpt: Checkpoint, job: Job, output: OutputFolder, qcfg: dict, max_shard_size: str, progress) -> int:
    """Write the output folder: source tensors in order, each quantized weight replaced by its packed tensors."""
    packed: dict[str, list[TensorInfo]] = {}
    for i in range(job.done):
        for name, info in read_header(job.layer_path(i))[0].items():
            packed.setdefault(name.rpartition(".")[0], []).append(info)
    infos: list[TensorInfo] = []
    for name, info in ckpt.index.infos.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix in packed:
            infos += sorted(packed.pop(prefix), key=lambda x: x.name)
        else:
            infos.append(info)
    if packed:
        raise QuantkitError(f"internal: quantized tensors with no source weight: {sorted(packed)[:3]}")
    by_name = {i.name: i for i in infos}
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in infos]
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_names(len(shards))
    total = sum(s.nbytes for s in specs)
    with output as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        weight_map = {}
        for fname, shard in zip(names, shards, strict=True):
            write_shard(tmp / fname, shard, lambda s: load_tensor(by_name[s.name]), on_bytes=bar.update)
            weight_map.update({s.name: fname for s in shard})
        write_index(tmp, weight_map, total)
        config = read_json(ckpt.folder / "config.json")
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        for f in ckpt.folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (HF_INDEX, "config.json", "README.md"):
                shutil.copy2(f, tmp / f.name)
    return total
