"""`quantkit quantize`: calibration rows -> embeddings -> one decoder layer at a time -> head -> packed output.

Only one decoder layer's weights are ever loaded (the model is built on the meta device and each layer is
materialized from the checkpoint, quantized, saved and freed), and hidden states live in the job's row stores on
disk, read one row at a time; so a 124B model needs one layer plus its Hessians in memory. The job (work dir)
makes the run resumable: rerun the same command after a crash and it continues at the last finished layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit.calib.rows import build_rows
from quantkit.calib.sources import load_calibration
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import HF_INDEX, read_json
from quantkit.io.claim import check_space
from quantkit.io.reader import TensorInfo, load_tensor, read_header
from quantkit.io.writer import OutputFolder, TensorSpec, parse_size, plan_shards, write_json, write_sharded
from quantkit.memory import map_large_blocks, release
from quantkit.model.load import Checkpoint, build_model, unload
from quantkit.quant.allocate import allocate
from quantkit.quant.capture import LinearSpec, QuantSettings, capture_groups, quantize_layer, solve_linear
from quantkit.quant.export import FORMATS, linear_tensors, model_card, quantization_config
from quantkit.quant.gptq import HessianAccumulator
from quantkit.quant.job import Job, default_work_dir, discard, exclusive, space_needed
from quantkit.quant.measure import CANDIDATES_VERSION, measure_layer, spec_bits
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


def _check_settings(model, s: QuantSettings, fmt: str, head_bits: int | None, vision: bool = False) -> None:
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
    if vision:
        if model.vision_tower is None:
            raise QuantkitError("--vision quantize: this model has no vision tower")
        vl = model.vision_tower.transformer.layers[0]
        shapes.update({f"vision {n}": tuple(vl.get_submodule(n).weight.shape) for g in capture_groups(vl) for n in g})
    for name, (out_f, in_f) in shapes.items():
        if s.group_size and in_f % s.group_size:
            raise QuantkitError(f"--group-size {s.group_size} does not divide {name}'s {in_f} input features")
        if fmt == "gptq" and (in_f % 32 or out_f % 32):
            raise QuantkitError(f"the GPTQ format needs features divisible by 32; {name} is [{out_f}, {in_f}]")


def plan(
    ckpt: Checkpoint, model, s: QuantSettings, head_bits: int | None, rows: int, seq_len: int, device: str, bpw=None
):
    """Sizes and peak memory from the config alone."""
    t = ckpt.config.text
    shapes = _linear_shapes(model, 0)
    per_layer = sum(o * i for o, i in shapes.values())
    quantized = per_layer * t.n_layers + (t.vocab_size * t.dim if head_bits else 0)
    kept = sum(info.numel for info in ckpt.index.infos.values()) - quantized
    # kept tensors are copied in their stored dtype: count them at the checkpoint's average bytes per parameter
    kept_bytes = kept * sum(i.nbytes for i in ckpt.index.infos.values()) / (kept + quantized)
    groups = lambda i: i // (s.group_size or i)  # noqa: E731
    packed = sum(o * i * s.bits / 8 + groups(i) * o * (2 + s.bits / 8) + 4 * i for o, i in shapes.values())
    head = (t.vocab_size * t.dim * head_bits / 8 + groups(t.dim) * t.vocab_size * 2.5) if head_bits else 0
    output = int((per_layer * bpw / 8 if bpw else packed) * t.n_layers + head + kept_bytes)
    largest_in = max(i for _, i in shapes.values())
    largest = max(o * i for o, i in shapes.values())
    layer_bytes = per_layer * 4  # fp32 working copy
    # The solver holds H and two more H-sized tensors at its peak (gptq._inverse_cholesky), and three copies of
    # the weight being solved; one row of activations flows through the layer.
    work = layer_bytes + 3 * largest_in**2 * 4 + 3 * largest * 4 + 4 * seq_len * max(t.ffn_dim, t.dim) * 4
    ram_base = 500_000_000  # Python, torch and the row being read
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


def _rotate_seeds(rotate: bool) -> Callable[[int, str], int | None]:
    """A fixed seed per linear (from its name) for the randomized Hadamard signs, or None without --rotate."""
    return (lambda i, name: zlib.crc32(f"layers.{i}.{name}".encode())) if rotate else (lambda i, name: None)


def _embed(ckpt: Checkpoint, model, job: Job, ids: torch.Tensor, row_shape, device, dtype) -> None:
    """Job step 0: the calibration rows' embeddings into the job's first row store."""
    if job.done >= 0:
        return
    _, nxt = job.stores(ids.shape[0], row_shape, dtype)
    ckpt.load(model, "embed_tokens", device, dtype)
    with torch.no_grad():
        for r in range(ids.shape[0]):
            nxt.write(r, model.embed(ids[r : r + 1]))
    unload(model.embed_tokens)
    job.finish(0)


def _measurement_fingerprint(ckpt: Checkpoint, ids: torch.Tensor, s: QuantSettings, rotate: bool, dtype) -> dict:
    """What a measurement depends on: the model, the rows, the candidate table and the GPTQ settings (not bits)."""
    fingerprint = {
        "source": _source_fingerprint(ckpt),
        "rows": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "candidates": CANDIDATES_VERSION,
        "rotate": rotate,
        "dtype": str(dtype),
        **asdict(s),
    }
    fingerprint.pop("bits")
    return fingerprint


def measure(
    ckpt: Checkpoint,
    model,
    ids: torch.Tensor,
    work: Path,
    s: QuantSettings,
    rotate: bool,
    device,
    dtype,
    progress,
    offload_dir: Path | None = None,
) -> dict:
    """The measurement pass (see measure.py), resumable in work/measure, saved as work/measurement.json."""
    fingerprint = _measurement_fingerprint(ckpt, ids, s, rotate, dtype)
    path = work / "measurement.json"
    if path.is_file():
        saved = read_json(path)
        if saved.get("fingerprint") == fingerprint:
            return saved
    job = Job(work / "measure", fingerprint, offload_dir=offload_dir)
    rows, n_layers = ids.shape[0], ckpt.config.text.n_layers
    row_shape = (1, ids.shape[1], ckpt.config.text.dim)
    _embed(ckpt, model, job, ids, row_shape, device, dtype)
    attn = job.store("attn", rows, row_shape, dtype)
    seeds = _rotate_seeds(rotate)
    with tqdm(total=n_layers, initial=job.done, desc="measure", unit="layer", disable=not progress) as bar:
        for i in range(job.done, n_layers):
            cur, nxt = job.stores(rows, row_shape, dtype)
            layer = ckpt.load(model, f"layers.{i}", device, dtype)
            ctx = model.context(0, torch.empty(row_shape, dtype=dtype, device=device))
            result = measure_layer(
                layer, rows, lambda r, cur=cur: cur.read(r).to(device), attn.read, attn.write, nxt.read, nxt.write,
                ctx, s, lambda name, i=i: seeds(i, name),
            )  # fmt: skip
            job.finish(i + 1, None, result)
            unload(layer)
            release()
            bar.update(1)
    data = {"version": 1, "fingerprint": fingerprint, "layers": [job.layer_info(i) for i in range(n_layers)]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


def load_measurement(path: Path, expected: dict | None = None) -> dict:
    """A saved measurement.json; refused when it was made for another model or other settings."""
    data = read_json(path)
    fp = data.get("fingerprint")
    if expected is not None and fp != expected:
        diff = sorted(k for k in set(expected) | set(fp or {}) if (fp or {}).get(k) != expected.get(k))
        raise QuantkitError(
            f"measurement {path} was made for another model or other settings (differs in: {', '.join(diff)}); "
            "measure again without --measurement"
        )
    return data


@exclusive  # locks DST and the work dir, removes dead runs' leftovers, OSError -> one line (quant/job.py)
def quantize(
    src: Path,
    dst: Path,
    *,
    settings: QuantSettings,
    fmt: str = "gptq",
    head_bits: int | None = None,
    bpw: float | None = None,
    rotate: bool = False,
    measurement: Path | None = None,
    measure_rows: int = 16,
    vision: str = "keep",
    dataset: str | None = None,
    split: str = "train",
    text_field: str = "text",
    rows: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    work_dir: Path | None = None,
    offload_dir: Path | None = None,
    restart: bool = False,
    force: bool = False,
    dry_run: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuantPlan:
    """Quantize the HF-layout model in src with GPTQ into dst (see the module docstring).

    With bpw, every block's quantization is chosen by measurement and allocation to hit that average over the
    decoder linears exactly (quantkit format); otherwise every linear gets settings.bits.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise QuantkitError(f"no config.json in {src}: quantize takes a converted (Hugging Face layout) folder")
    if (bpw is not None or rotate) and fmt != "quantkit":
        raise QuantkitError("--bpw and --rotate write the quantkit format (--format quantkit)")
    if vision not in ("keep", "quantize"):
        raise QuantkitError(f"--vision must be keep or quantize, got {vision!r}")
    if bpw is not None and settings.group_size is None:
        raise QuantkitError("--bpw mixes bit widths by groups of columns: give a --group-size (32, 64 or 128)")
    ckpt = Checkpoint(src)
    model = build_model(ckpt.config)
    _check_settings(model, settings, fmt, head_bits, vision == "quantize")
    the_plan = plan(ckpt, model, settings, head_bits, rows, seq_len, device, bpw)
    if dry_run:
        return the_plan
    work = Path(work_dir or default_work_dir(dst))
    output = OutputFolder(dst, force=force, src=src, work=work)
    check_space(space_needed(dst, work, offload_dir, the_plan.output_bytes, rows, seq_len, ckpt.config.text.dim))
    map_large_blocks()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype or ("float32" if device == "cpu" else "bfloat16")
    ]
    crows = _calibration(ckpt, dataset, split, text_field, rows, seq_len, seed)
    ids = crows.ids  # [rows, seq_len]
    if restart:
        discard(work)
    n_layers, dim = ckpt.config.text.n_layers, ckpt.config.text.dim
    seeds = _rotate_seeds(rotate)
    shapes = [_linear_shapes(model, i) for i in range(n_layers)]
    if bpw is not None:
        m_ids = ids[: min(measure_rows, rows)]
        if measurement is not None:
            meas = load_measurement(measurement, _measurement_fingerprint(ckpt, m_ids, settings, rotate, torch_dtype))
        else:
            meas = measure(ckpt, model, m_ids, work, settings, rotate, device, torch_dtype, progress, offload_dir)
        alloc = allocate(meas, shapes, bpw, settings, seeds)
        log(f"allocation: {alloc.bpw:.4f} bits per decoder weight for --bpw {bpw} ({alloc.bits / 8e9:.3f} GB)")
        specs = alloc.specs
    else:
        specs = [
            {n: LinearSpec(settings.bits, settings.group_size, seeds(i, n)) for n in shapes[i]} for i in range(n_layers)
        ]
    strategy = hashlib.sha256(repr(specs).encode()).hexdigest()[:16]
    job_settings = {
        "source": _source_fingerprint(ckpt),
        "format": fmt,
        "head_bits": head_bits,
        "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "dtype": str(torch_dtype),
        "strategy": strategy,
        **asdict(settings),
    }
    job = Job(work, job_settings, offload_dir=offload_dir)
    row_shape = (1, seq_len, dim)
    if job.done > 0:
        log(f"resuming at layer {job.done}/{n_layers} (work dir {job.dir}; --restart discards it)")
    _embed(ckpt, model, job, ids, row_shape, device, torch_dtype)

    bar = tqdm(total=n_layers, initial=job.done, desc="quantize", unit="layer", disable=not progress)
    with bar:
        for i in range(job.done, n_layers):
            t0 = time.perf_counter()
            cur, nxt = job.stores(rows, row_shape, torch_dtype)
            layer = ckpt.load(model, f"layers.{i}", device, torch_dtype)
            ctx = model.context(0, torch.empty(row_shape, dtype=torch_dtype, device=device))
            tensors: dict[str, torch.Tensor] = {}

            def emit(name: str, solved, i=i, tensors=tensors) -> None:
                prefix = _prefix(ckpt, f"layers.{i}.{name}")
                tensors.update({f"{prefix}.{k}": t for k, t in linear_tensors(fmt, solved).items()})

            report = quantize_layer(
                layer, rows, lambda r, cur=cur: cur.read(r).to(device), nxt.read, nxt.write, ctx, settings,
                specs[i].__getitem__, emit,
            )  # fmt: skip
            layer_bits = sum(spec_bits(specs[i][n], o, k, settings) for n, (o, k) in shapes[i].items())
            avg = layer_bits / sum(o * k for o, k in shapes[i].values())
            info = {"bpw": avg, "rel_error": report.rel_error, "starved_experts": report.starved}
            job.finish(i + 1, tensors, info)
            unload(layer)
            release()
            bar.update(1)
            msg = f"layer {i + 1}/{n_layers}: {avg:.2f} bits per weight, rel. output error {report.rel_error:.4f}"
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
        head_spec = LinearSpec(head_bits, settings.group_size, seeds(-1, "lm_head"))
        solved = solve_linear(model.lm_head.weight.data, acc.hessian(), head_spec, settings)
        tensors = {f"{_prefix(ckpt, 'lm_head')}.{k}": t for k, t in linear_tensors(fmt, solved).items()}
        job.finish(n_layers + 1, tensors, {"bits": head_bits, "rel_loss": solved.result.rel_loss})
        unload(model.lm_head)
        unload(model.norm)

    if vision == "quantize" and job.done == n_layers + (head_bits is not None):
        tensors = _quantize_vision(ckpt, model, settings, fmt, seeds, device, torch_dtype, progress, log)
        job.finish(job.done + 1, tensors, {"vision_bits": settings.bits})

    qcfg = quantization_config(fmt, settings, crows.provenance, head_bits)
    if fmt == "quantkit":
        qcfg["bpw"], qcfg["rotate"] = bpw, rotate
        qcfg["modules"] = {
            _prefix(ckpt, f"layers.{i}.{n}"): {"bits": sp.bits, "group_size": sp.group_size}
            for i in range(n_layers)
            for n, sp in specs[i].items()
        }
    size = _assemble(ckpt, job, output, qcfg, max_shard_size, progress)
    card = model_card(dst.name, fmt, settings, crows.provenance, size, head_bits, bpw, rotate)
    (dst / "README.md").write_text(card)
    job.cleanup()
    log(f"wrote {dst} ({size / 1e9:.3f} GB)")
    return the_plan


def _quantize_vision(ckpt: Checkpoint, model, s: QuantSettings, fmt: str, seeds, device, dtype, progress, log):
    """GPTQ for the vision tower's linears (--vision quantize), calibrated on the bundled images, one layer at a time;
    patch conv, norms and the projector stay 16-bit. Returns the packed tensors."""
    from PIL import Image

    from quantkit.calib.sources import default_images
    from quantkit.tokenizer.image import preprocess_image

    vt = model.vision_tower
    images = [preprocess_image(Image.open(p)) for p in default_images()]
    if not images:
        raise QuantkitError("--vision quantize needs calibration images: calib_data/images/ is empty")
    ckpt.load(model, "vision_tower.patch_conv", device, dtype)
    ckpt.load(model, "vision_tower.ln_pre", device, dtype)
    with torch.no_grad():
        h, vctx = vt.embed(images)  # [1, patches of all images, D]
    unload(vt.patch_conv)
    unload(vt.ln_pre)
    tensors: dict[str, torch.Tensor] = {}
    for j in tqdm(range(len(vt.transformer.layers)), desc="vision", unit="layer", disable=not progress):
        name = f"vision_tower.transformer.layers.{j}"
        layer = ckpt.load(model, name, device, dtype)
        out: dict[str, torch.Tensor] = {"y": h}  # one row: all images' patches; the float output lands here first

        def emit(linear: str, solved, name=name) -> None:
            prefix = _prefix(ckpt, f"{name}.{linear}")
            tensors.update({f"{prefix}.{k}": t for k, t in linear_tensors(fmt, solved).items()})

        report = quantize_layer(
            layer, 1, lambda r, h=h: h, lambda r, out=out: out["y"], lambda r, y, out=out: out.__setitem__("y", y),
            vctx, s,
            lambda n, j=j: LinearSpec(s.bits, s.group_size, seeds(-2 - j, n)), emit,
        )  # fmt: skip
        h = out["y"]
        unload(layer)
        log(f"vision layer {j + 1}/{len(vt.transformer.layers)}: {s.bits} bits, rel. error {report.rel_error:.4f}")
    return tensors


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
    total = sum(s.nbytes for s in specs)
    with output as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        write_sharded(tmp, shards, lambda s: load_tensor(by_name[s.name]), on_bytes=bar.update)
        config = read_json(ckpt.folder / "config.json")
        config["quantization_config"] = qcfg
        write_json(tmp / "config.json", config)
        for f in ckpt.folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (HF_INDEX, "config.json", "README.md"):
                shutil.copy2(f, tmp / f.name)
    return total
