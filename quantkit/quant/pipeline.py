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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit import STARTED
from quantkit.arch import export_name
from quantkit.arch.blocks import block_of, expert_index, role_of, vision_embed, vision_layers
from quantkit.calib.rows import tokenized_rows
from quantkit.calib.sources import load_calibration
from quantkit.errors import QuantkitError
from quantkit.formats.base import Built, OutputFormat
from quantkit.formats.registry import get_format
from quantkit.io.checkpoint import HF_INDEX, read_json
from quantkit.io.claim import check_space
from quantkit.io.reader import TensorInfo, load_tensor, read_header
from quantkit.io.writer import OutputFolder, TensorSpec, parse_size, plan_shards, write_json, write_sharded
from quantkit.memory import frozen_heap, map_large_blocks, release
from quantkit.model.load import Checkpoint, build_model, unload
from quantkit.quant.allocate import allocate, needed_candidates, reachable_bpw
from quantkit.quant.capture import LayerIO, LinearSpec, MemoryRows, capture_groups, quantize_layer
from quantkit.quant.estimate import COUNT_FLOPS, estimate_seconds, human_seconds, measure_rates
from quantkit.quant.export import model_card
from quantkit.quant.gptq import HessianAccumulator
from quantkit.quant.job import Job, claimed, default_work_dir, discard, space_needed
from quantkit.quant.measure import (
    CANDIDATES_VERSION,
    PROBE_BITS,
    PROBE_ROWS,
    PROBE_TOKENS,
    measure_layer,
    measure_work,
)
from quantkit.quant.settings import (
    AUTO,
    QuantizeOptions,
    QuantSettings,
    check_against_model,
    check_bpw_reachable,
    group_size_words,
    resolve_group_size,
)
from quantkit.quant.solvers import SOLVERS
from quantkit.tokenizer.chat import ChatTokenizer

IMPORT_SECONDS = time.perf_counter() - STARTED  # importing quantkit and this module: a run's start-up


@dataclass
class QuantPlan:
    """The --dry-run answer: what will be quantized and how, the output size, and the memory the run needs."""

    layers: int
    quantized_params: int
    kept_params: int
    output_bytes: int
    peak_ram_bytes: int
    peak_device_bytes: int
    device: str
    fmt: str = ""  # the output format's name
    bits: str = ""  # how the decoder is stored, in words
    calibration: str = ""
    work_bytes: int = 0  # the work dir's peak: finished layers (at most the output) and the hidden-state row stores
    seconds: float | None = None  # expected time (dry run only: quant/estimate.py)
    time_basis: str = ""
    group_choice: str = ""  # how --group-size auto resolved, in words ("" when the size was given)

    def summary(self) -> str:
        return "\n".join(
            [
                f"format: {self.fmt}; {self.bits}",
                *([f"group size: {self.group_choice}"] if self.group_choice else []),
                f"calibration: {self.calibration}",
                f"decoder layers: {self.layers}",
                f"quantized parameters: {self.quantized_params:,}; kept 16-bit: {self.kept_params:,}",
                f"output size: {self.output_bytes / 1e9:.2f} GB",
                f"work files: up to {self.work_bytes / 1e9:.2f} GB (finished layers and hidden-state row stores)",
                f"peak memory: {self.peak_ram_bytes / 1e9:.2f} GB RAM"
                + (f", {self.peak_device_bytes / 1e9:.2f} GB on {self.device}" if self.device != "cpu" else ""),
                *([f"expected time: about {human_seconds(self.seconds)} (an estimate: {self.time_basis})"]
                  if self.seconds is not None else []),
            ]
        )  # fmt: skip


def _linear_shapes(model, layer_idx: int) -> dict[str, tuple[int, int]]:
    layer = model.layers[layer_idx]
    return {n: tuple(layer.get_submodule(n).weight.shape) for g in capture_groups(layer) for n in g}


def _checked_shapes(model, o: QuantizeOptions) -> dict[str, tuple[int, int]]:
    """Every kind of linear the run quantizes, named for error messages: (out, in)."""
    shapes = _linear_shapes(model, 0)
    if o.head_bits is not None:
        shapes["lm_head"] = tuple(model.lm_head.weight.shape)
    if o.vision == "quantize":
        if model.vision_tower is None:
            raise QuantkitError("--vision quantize: this model has no vision tower")
        vl = model.get_submodule(vision_layers())[0]
        shapes.update({f"vision {n}": tuple(vl.get_submodule(n).weight.shape) for g in capture_groups(vl) for n in g})
    return shapes


def _stored_bits(o: QuantizeOptions, out_f: int, in_f: int, bits: int) -> int:
    """Bits on disk of one linear stored uniformly with `bits` under o's settings and format."""
    spec = LinearSpec(bits, o.settings.group_size, 0 if o.rotate else None)
    return o.format.stored_bits(spec, out_f, in_f, o.settings)


def _calibration_words(o: QuantizeOptions) -> str:
    where = o.dataset or "the bundled mix"
    return f"{o.rows} rows x {o.seq_len} tokens from {where}" + (
        f"; --bpw measures on the first {min(o.measure_rows, o.rows)}" if o.bpw is not None else ""
    )


def plan(ckpt: Checkpoint, model, o: QuantizeOptions, bpw_range: tuple[float, float] | None = None) -> QuantPlan:
    """What the run will write and the memory it needs, from the config and the cost model alone."""
    t, s = ckpt.config.text, o.settings
    shapes = _linear_shapes(model, 0)
    per_layer = sum(out * i for out, i in shapes.values())
    quantized = per_layer * t.n_layers + (t.vocab_size * t.dim if o.head_bits else 0)
    kept = sum(info.numel for info in ckpt.index.infos.values()) - quantized
    # kept tensors are copied in their stored dtype: count them at the checkpoint's average bytes per parameter
    kept_bytes = kept * sum(i.nbytes for i in ckpt.index.infos.values()) / (kept + quantized)
    if o.bpw is not None:
        layer_bits = per_layer * o.bpw
        lo, hi = bpw_range or (float("nan"), float("nan"))
        words = f"--bpw {o.bpw} (this model reaches {lo:.3f} to {hi:.3f}), group {s.group_size or 'none'}"
    else:
        layer_bits = sum(_stored_bits(o, out, i, s.bits) for out, i in shapes.values())
        words = f"{s.bits} bits ({layer_bits / per_layer:.3f} bits per weight stored), group {s.group_size or 'none'}"
    words += f", act order {'on' if s.act_order else 'off'}, {'sym' if s.sym else 'asym'}"
    head = _stored_bits(o, t.vocab_size, t.dim, o.head_bits) if o.head_bits else 0
    output = int((layer_bits * t.n_layers + head) / 8 + kept_bytes)
    largest_in = max(i for _, i in shapes.values())
    largest = max(out * i for out, i in shapes.values())
    layer_bytes = per_layer * 4  # fp32 working copy
    # The solver holds H and two more H-sized tensors at its peak (gptq._inverse_cholesky), and three copies of
    # the weight being solved; one row of activations flows through the layer.
    work = layer_bytes + 3 * largest_in**2 * 4 + 3 * largest * 4 + 4 * o.seq_len * max(t.ffn_dim, t.dim) * 4
    ram_base = 500_000_000  # Python, torch and the row being read
    ram, dev = (ram_base + work, 0) if o.device == "cpu" else (ram_base + layer_bytes, work)
    stores = 4 * o.rows * o.seq_len * t.dim * 4  # as space_needed counts them
    return QuantPlan(t.n_layers, quantized, kept, output, ram, dev, o.device, o.fmt, words, _calibration_words(o),
                     output + stores)  # fmt: skip


def _with_time(the_plan: QuantPlan, model, o: QuantizeOptions, shapes, t) -> QuantPlan:
    """The plan with its expected time: the run's work counted from the shapes, at rates timed on o.device now,
    plus the start-up (importing quantkit, torch and the quantizer, as this process did), which the run pays too."""
    startup = IMPORT_SECONDS
    trellis_k = (o.settings.bits if o.bpw is None else round(o.bpw)) if o.format.solver == "trellis" else None
    rates = measure_rates(o.device, o.torch_dtype, o.settings, (o.seq_len, t.dim, t.ffn_dim), trellis_k)
    estimate = partial(
        estimate_seconds, shapes, capture_groups(model.layers[0]), rows=o.rows, seq_len=o.seq_len,
        attn_dim=t.n_heads * t.head_dim, head=(t.vocab_size, t.dim) if o.head_bits else None,
        measure=measure_work(o.format, min(o.measure_rows, o.rows), (t.vocab_size, t.dim), t.n_experts > 0,
                             None if o.measure_all else _needed(o, shapes)[0])
        if o.bpw is not None and o.measurement is None else None, block_of=block_of, role_of=role_of,
    )  # fmt: skip
    seconds, flops = startup + estimate(rates=rates), estimate(rates=COUNT_FLOPS)
    basis = (f"{flops / 1e15:,.3g} PFLOP of work counted from the model's shapes at {rates.matmul / 1e9:.3g} "
             f"GFLOP/s matmul and "
             f"{rates.cholesky / 1e9:.3g} GFLOP/s Cholesky timed on {o.device} just now, and {startup:.1f} s of "
             "start-up (imports) as this process took; reading and writing the "
             "checkpoint" + (" and the vision tower" if o.vision == "quantize" else "") + " not counted"
             + (f"; the trellis encoding at {rates.trellis * 1e6:.0f} µs per weight (K = {trellis_k}, timed just "
                "now; a wider K range costs more per weight at lower K)" if trellis_k is not None else ""))  # fmt: skip
    return replace(the_plan, seconds=seconds, time_basis=basis)


def _source_fingerprint(ckpt: Checkpoint) -> str:
    h = hashlib.sha256((ckpt.folder / "config.json").read_bytes())
    for name, info in sorted(ckpt.index.infos.items()):
        h.update(f"{name}:{info.dtype}:{info.shape}:{info.file.name}:{info.file.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _calibration(ckpt: Checkpoint, dataset, split, text_field, rows, seq_len, seed):
    tok = ChatTokenizer.from_folder(ckpt.folder)
    calib = load_calibration(dataset, split=split, text_field=text_field)
    return tokenized_rows(tok, calib, rows, seq_len, seed)


def _repeat_note(provenance: dict) -> str | None:
    """A line when the rows·seq_len token budget reuses the calibration data (the bundled mix is small)."""
    passes = {name: st["passes"] for name, st in provenance.get("sources", {}).items() if st.get("passes", 1) > 1}
    if not passes:
        return None
    most = max(passes.values())
    return (
        f"calibration: {provenance['rows']} x {provenance['seq_len']} tokens repeat {provenance['dataset']} "
        f"(up to {most} passes over {len(passes)} of its sources); fewer --rows/--seq-len or a larger --dataset "
        "avoid that"
    )


def _prefix(ckpt: Checkpoint, model_name: str, names: str = "gptqmodel") -> str:
    """The name of one of our modules in an export's naming (quantkit.arch export_name). Job files and the `dynamic`
    rules' units use GPTQModel's (the rules match both namings); _assemble renames to the requested one."""
    return export_name(ckpt.config.arch, ckpt.key(model_name + ".weight"), names).removesuffix(".weight")


def _rotate_seeds(rotate: bool) -> Callable[[int, str], int | None]:
    """A fixed seed per linear (from its name) for the randomized Hadamard signs, or None without --rotate."""
    return (lambda i, name: zlib.crc32(f"layers.{i}.{name}".encode())) if rotate else (lambda i, name: None)


def _embed(ckpt: Checkpoint, model, job: Job, ids: torch.Tensor, row_shape, device, dtype) -> None:
    """Job step "embed": the calibration rows' embeddings into the job's first row store."""
    if job.finished("embed"):
        return
    _, nxt = job.stores(ids.shape[0], row_shape, dtype)
    ckpt.load(model, "embed_tokens", device, dtype)
    with torch.no_grad():
        for r in range(ids.shape[0]):
            nxt.write(r, model.embed(ids[r : r + 1]))
    unload(model.embed_tokens)
    job.finish("embed", wrote_rows=True)


def _measurement_fingerprint(
    ckpt: Checkpoint, ids: torch.Tensor, s: QuantSettings, rotate: bool, dtype, fmt: OutputFormat | str
) -> dict:
    """What a measurement depends on: the model, the rows, the candidate table and the GPTQ settings (not bits)."""
    fingerprint = {
        "source": _source_fingerprint(ckpt),
        "rows": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "candidates": CANDIDATES_VERSION,
        "rotate": rotate,
        "dtype": str(dtype),
        **get_format(fmt).measurement_key(),
        **asdict(s),
    }
    fingerprint.pop("bits")
    return fingerprint


def layer_steps(n_layers: int) -> list[str]:
    """The job steps of a decoder pass: "layer.0" .. "layer.N-1"."""
    return [f"layer.{i}" for i in range(n_layers)]


def job_steps(n_layers: int, head: bool, vision: bool) -> list[str]:
    """A quantize job's named steps, in order: embeddings, every decoder layer, then the head and the vision tower."""
    return ["embed", *layer_steps(n_layers), *(["head"] if head else []), *(["vision"] if vision else [])]


def _layers(ckpt: Checkpoint, model, job: Job | None, names: list[str], device, dtype, desc: str, progress: bool):
    """The one layer loop: for every layer whose step ("layer.i") job has not finished (all of them without a job),
    load it, yield (index, layer) for the caller's step (which ends with job.finish), then unload it and free it."""
    todo = [i for i, step in enumerate(layer_steps(len(names))) if job is None or not job.finished(step)]
    with tqdm(total=len(names), initial=len(names) - len(todo), desc=desc, unit="layer", disable=not progress) as bar:
        for i in todo:
            layer = ckpt.load(model, names[i], device, dtype)
            yield i, layer
            unload(layer)
            release()
            bar.update(1)


def _needed(o: QuantizeOptions, shapes) -> list[dict[str, list[str]]]:
    """The candidates o.bpw can choose, per layer and block (allocate.needed_candidates)."""
    return needed_candidates(shapes, o.bpw, o.settings, _rotate_seeds(o.rotate), o.format)


def _covers(data: dict, wanted: list[dict[str, list[str]]] | None) -> bool:
    """Whether a measurement holds every wanted candidate (None: every candidate of the format)."""
    return wanted is not None and all(
        set(names) <= {e["candidate"] for e in layer[block]}
        for layer, want in zip(data.get("layers") or [], wanted, strict=True) for block, names in want.items()
    )  # fmt: skip


def measure(ckpt: Checkpoint, model, ids: torch.Tensor, work: Path, o: QuantizeOptions, progress: bool = True,
            wanted: list[dict[str, list[str]]] | None = None) -> dict:  # fmt: skip
    """The measurement pass (see measure.py), resumable in work/measure, saved as work/measurement.json.
    wanted: per layer and block, the candidates to measure (None: all, so that any --bpw target can reuse it)."""
    s, device, dtype = o.settings, o.device, o.torch_dtype
    fingerprint = _measurement_fingerprint(ckpt, ids, s, o.rotate, dtype, o.format)
    path = work / "measurement.json"
    if path.is_file():
        saved = read_json(path)
        if saved.get("fingerprint") == fingerprint and (saved.get("scope") == "all" or _covers(saved, wanted)):
            return saved
    rows, n_layers = ids.shape[0], ckpt.config.text.n_layers
    scope = "all" if wanted is None else hashlib.sha256(json.dumps(wanted).encode()).hexdigest()[:16]
    job = Job(work / "measure", {**fingerprint, "scope": scope}, ["embed", *layer_steps(n_layers)],
              offload_dir=o.offload_dir)  # fmt: skip
    row_shape = (1, ids.shape[1], ckpt.config.text.dim)
    _embed(ckpt, model, job, ids, row_shape, device, dtype)
    attn = job.store("attn", rows, row_shape, dtype)
    seeds = _rotate_seeds(o.rotate)
    names = [f"layers.{i}" for i in range(n_layers)]
    p_rows, p_shape = min(PROBE_ROWS, rows), (1, min(PROBE_TOKENS, ids.shape[1]), row_shape[2])
    p_ctx = model.context(0, torch.empty(p_shape, dtype=dtype, device=device))
    streams = 2 * len(PROBE_BITS) * p_rows  # per layer: each block at each probe width, each probe row
    for i, layer in _layers(ckpt, model, job, names, device, dtype, "measure", progress):
        cur, nxt = job.stores(rows, row_shape, dtype)
        p_cur, p_nxt = job.stores(streams * n_layers, p_shape, dtype, name="probe")
        with torch.no_grad():  # the earlier blocks' probe streams go on through this (float) layer
            for j in range(streams * i):
                p_nxt.write(j, layer(p_cur.read(j).to(device), p_ctx))

        def probe(block: str, k: int, r: int, h: torch.Tensor, i: int = i, out=p_nxt) -> None:
            out.write(((2 * i + (block == "mlp")) * len(PROBE_BITS) + k) * p_rows + r, h[:, : p_shape[1]])

        io = LayerIO(rows, cur, nxt, device, middle=attn)
        ctx = model.context(0, torch.empty(row_shape, dtype=dtype, device=device))
        info = measure_layer(layer, io, ctx, s, lambda name, i=i: seeds(i, name), o.format, probe, p_rows,
                             None if wanted is None else wanted[i])  # fmt: skip
        job.finish(f"layer.{i}", None, info, True)
    kl = _probe_kl(ckpt, model, job, rows, row_shape, p_rows, p_shape, device, dtype)
    data = {"version": 2, "fingerprint": fingerprint, "scope": "all" if wanted is None else f"--bpw {o.bpw}",
            "layers": [job.info(step) for step in layer_steps(n_layers)],
            "probe": {"rows": p_rows, "tokens": p_shape[1], "bits": list(PROBE_BITS), "kl": kl}}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


def _probe_kl(ckpt, model, job: Job, rows: int, row_shape, p_rows: int, p_shape, device, dtype) -> list:
    """Per layer [attn, mlp], per probe width: the mean KL divergence (nats per token) at the logits between the
    float model and the model with only that block quantized at that width, on the probe rows' first tokens."""
    n_layers, n_probes = ckpt.config.text.n_layers, len(PROBE_BITS)
    cur, _ = job.stores(rows, row_shape, dtype)
    p_cur, _ = job.stores(2 * n_probes * p_rows * n_layers, p_shape, dtype, name="probe")
    ckpt.load(model, "norm", device, dtype)
    ckpt.load(model, "lm_head", device, dtype)
    total = [0.0] * (2 * n_layers * n_probes)
    with torch.no_grad():
        for r in range(p_rows):
            ref = torch.log_softmax(model.head(cur.read(r)[:, : p_shape[1]].to(device)).float(), -1)
            p = ref.exp()
            for b in range(len(total)):
                logp = torch.log_softmax(model.head(p_cur.read(b * p_rows + r).to(device)).float(), -1)
                total[b] += float(logp.neg_().add_(ref).mul_(p).sum(-1).mean()) / p_rows  # KL(float || probed)
    unload(model.lm_head)
    unload(model.norm)
    per_block = [total[k : k + n_probes] for k in range(0, len(total), n_probes)]
    return [per_block[2 * i : 2 * i + 2] for i in range(n_layers)]


def load_measurement(
    path: Path, fmt: OutputFormat | str, expected: dict | None = None, n_layers: int | None = None, shapes=None,
    wanted: list[dict[str, list[str]]] | None = None,
) -> dict:
    """A saved measurement.json; refused when it was made for another model, other settings or is incomplete
    (lacks candidates of the format, or of `wanted` when given: what the target can choose)."""
    fmt = get_format(fmt)
    data = read_json(path)
    layers = data.get("layers")
    if n_layers is not None and (not isinstance(layers, list) or len(layers) != n_layers):
        found = len(layers) if isinstance(layers, list) else 0
        raise QuantkitError(f"measurement {path} covers {found} layers, the model has {n_layers}: measure again")
    probe = data.get("probe") or {}
    if layers and not (isinstance(probe.get("kl"), list) and len(probe["kl"]) == len(layers)):
        raise QuantkitError(f"measurement {path} has no end-to-end probe (an older quantkit made it): measure again")
    for i, layer in enumerate(layers or []):
        for block in ("attn", "mlp"):
            names = {c.get("candidate") for c in (layer or {}).get(block) or [] if isinstance(c, dict)}
            moe = shapes is not None and i < len(shapes) and any(
                expert_index(n) is not None and block_of(n) == block for n in shapes[i])  # fmt: skip
            need = {c.name for c in fmt.candidates(block, moe)} if wanted is None else set(wanted[i][block])
            if not need <= names:
                raise QuantkitError(f"measurement {path}: layer {i} lacks {block} candidates this target can choose "
                                    f"({', '.join(sorted(need - names))}): measure again (--measure-all measures for "
                                    "any target)")  # fmt: skip
    fp = data.get("fingerprint")
    if expected is not None and fp != expected:
        diff = sorted(k for k in set(expected) | set(fp or {}) if (fp or {}).get(k) != expected.get(k))
        raise QuantkitError(
            f"measurement {path} was made for another model or other settings (differs in: {', '.join(diff)}); "
            "measure again without --measurement"
        )
    return data


def _emitter(ckpt: Checkpoint, fmt: OutputFormat, prefix: str, tensors: dict[str, torch.Tensor]):
    """emit(name, solved) for quantize_layer: the packed tensors of prefix.name into tensors."""

    def emit(name: str, solved) -> None:
        key = _prefix(ckpt, f"{prefix}.{name}")
        tensors.update({f"{key}.{k}": t for k, t in fmt.tensors(solved).items()})

    return emit


def quantize(
    src: Path, dst: Path, o: QuantizeOptions, progress: bool = True, log: Callable[[str], None] = print
) -> QuantPlan:
    """Quantize the HF-layout model in src with GPTQ into dst as o asks (see the module docstring); o is checked
    here too (QuantizeOptions.check), so library callers get the CLI's refusals.

    With o.bpw, every block's quantization is chosen by measurement and allocation to hit that average over the
    decoder linears (just under it; in the GPTQ format among uniform 2/3/4/8-bit choices that GPTQ loaders run);
    otherwise every linear gets o.settings.bits. Except for --dry-run, DST and the work dir are claimed first, for
    the whole run (a second run is refused at once), and what dead runs left there is removed.
    """
    src, dst = Path(src), Path(dst)
    o = o.check()
    work = Path(o.work_dir or default_work_dir(dst))
    with nullcontext() if o.dry_run else claimed(dst, work, log):
        return _plan(src, dst, o, work, progress, log)


def _plan(src: Path, dst: Path, o: QuantizeOptions, work: Path, progress: bool, log: Callable[[str], None]):
    """The plan (what --dry-run prints), then the run unless o.dry_run."""
    if not (src / "config.json").is_file():
        raise QuantkitError(f"no config.json in {src}: quantize takes a converted (Hugging Face layout) folder")
    ckpt = Checkpoint(src)
    model = build_model(ckpt.config)
    checked = _checked_shapes(model, o)
    group_choice, group_why = "", None
    if o.settings.group_size == AUTO:  # resolved once, here: job, measurement and config all see the concrete size
        g, group_why = resolve_group_size(checked)
        o = replace(o, settings=replace(o.settings, group_size=g))
        group_choice = group_size_words(g, group_why)
    check_against_model(o, read_json(src / "config.json"), checked)
    n_layers = ckpt.config.text.n_layers
    shapes = [_linear_shapes(model, i) for i in range(n_layers)]
    bpw_range = None
    if o.bpw is not None:
        bpw_range = reachable_bpw(shapes, o.settings, _rotate_seeds(o.rotate), o.format)
        check_bpw_reachable(o.bpw, *bpw_range)
        if o.measurement is not None:
            load_measurement(o.measurement, o.format, n_layers=n_layers, shapes=shapes, wanted=_needed(o, shapes))
    the_plan = replace(plan(ckpt, model, o, bpw_range), group_choice=group_choice)
    output = OutputFolder(dst, force=o.force, src=src, work=work)  # validates dst before any work, dry run included
    if o.dry_run:
        return _with_time(the_plan, model, o, shapes, ckpt.config.text)
    with frozen_heap():
        check_space(space_needed(dst, work, o.offload_dir, the_plan.output_bytes, o.rows, o.seq_len,
                                 ckpt.config.text.dim))  # fmt: skip
        _run(ckpt, model, o, shapes, dst, output, work, group_choice, group_why, progress, log)
    return the_plan


def _run(ckpt: Checkpoint, model, o: QuantizeOptions, shapes, dst: Path, output: OutputFolder, work: Path,
         group_choice: str, group_why: str | None, progress: bool, log: Callable[[str], None]) -> None:  # fmt: skip
    """The run itself: calibration, --bpw allocation, the decoder (then head, vision) layer by layer, assembly."""
    t = ckpt.config.text
    if group_choice:
        log(f"group size: {group_choice}")
    map_large_blocks()
    crows = _calibration(ckpt, o.dataset, o.split, o.text_field, o.rows, o.seq_len, o.seed)
    ids = crows.ids  # [rows, seq_len]
    if note := _repeat_note(crows.provenance):
        log(note)
    if o.restart:
        discard(work)
    seeds = _rotate_seeds(o.rotate)
    s = o.settings
    if o.bpw is not None:
        specs, predicted = _allocate(ckpt, model, ids, work, o, shapes, seeds, progress, log)
    else:
        predicted = None
        specs = [{n: LinearSpec(s.bits, s.group_size, seeds(i, n)) for n in layer} for i, layer in enumerate(shapes)]
    steps = job_steps(t.n_layers, o.head_bits is not None, o.vision == "quantize")
    job = Job(work, _job_settings(ckpt, o, ids, specs), steps, offload_dir=o.offload_dir)
    if job.done:
        layers_done = sum(job.finished(step) for step in layer_steps(t.n_layers))
        log(f"resuming at layer {layers_done}/{t.n_layers}, step {job.next} "
            f"(work dir {job.dir}; --restart discards it)")  # fmt: skip
    _quantize_decoder(ckpt, model, job, ids, o, specs, shapes, progress, log)
    if o.head_bits is not None and not job.finished("head"):
        _quantize_head(ckpt, model, job, o, seeds)
    if o.vision == "quantize" and not job.finished("vision"):
        tensors = _quantize_vision(ckpt, model, o, seeds, progress, log)
        job.finish("vision", tensors, {"vision_bits": s.bits})
    if job.next is not None:
        raise QuantkitError(f"internal: quantize job stopped before step {job.next}")

    qcfg = _output_config(ckpt, o, specs, crows.provenance, model.vision_tower is not None, predicted, shapes)

    def card(size: int) -> str:
        return model_card(dst.name, o.format, qcfg, s, crows.provenance, size, o.head_bits, o.bpw, o.rotate,
                          ckpt.config.arch, group_why, o.export_names)  # fmt: skip

    size = _assemble(ckpt, job, output, qcfg, card, o.max_shard_size, progress, o.export_names)
    job.cleanup()
    log(f"wrote {dst} ({size / 1e9:.3f} GB)")


def _output_config(
    ckpt: Checkpoint, o: QuantizeOptions, specs, provenance: dict, vision: bool = False, predicted=None, shapes=None
) -> dict:
    """config.json's quantization_config, as the output format writes it; a --bpw build also records the
    allocator's predicted KL per layer and block (`allocation`, shown by `inspect --card`) with quantkit's fields."""
    built = Built(
        o.settings, provenance, o.head_bits, o.bpw, o.rotate, specs,
        lambda name, names: _prefix(ckpt, name, names), o.export_names, vision,
        o.settings.bits if o.vision == "quantize" else None, predicted, shapes,
    )  # fmt: skip
    qcfg = o.format.quantization_config(built)
    if predicted is not None:
        o.format.own_fields(qcfg)["allocation"] = {
            "objective": "predicted KL: each block's KL probed at 2/3/4 bits, interpolated in its local error",
            "predicted_kl": [{b: round(v, 6) for b, v in layer.items()} for layer in predicted],
        }
    return qcfg


def _allocate(ckpt, model, ids, work: Path, o: QuantizeOptions, shapes, seeds, progress, log):
    """--bpw: measure (or reuse --measurement), then choose every block's storage for the target."""
    m_ids = ids[: min(o.measure_rows, o.rows)]
    if o.measurement is not None:
        expected = _measurement_fingerprint(ckpt, m_ids, o.settings, o.rotate, o.torch_dtype, o.format)
        meas = load_measurement(o.measurement, o.format, expected, len(shapes), shapes, _needed(o, shapes))
    else:
        meas = measure(ckpt, model, m_ids, work, o, progress, None if o.measure_all else _needed(o, shapes))
        reuse = "any --bpw target" if o.measure_all else "this --bpw target's width window; --measure-all for any"
        log(f"measurement: {work / 'measurement.json'} (reuse it with --measurement: {reuse})")
    alloc = allocate(meas, shapes, o.bpw, o.settings, seeds, o.format)
    total = sum(v for layer in alloc.predicted for v in layer.values())
    log(
        f"allocation: {alloc.bpw:.4f} bits per decoder weight for --bpw {o.bpw} "
        f"({alloc.bits:,} bits, {alloc.bits / 8e9:.3f} GB), predicted KL {total:.4g}"
    )
    if alloc.window is not None:
        log(f"allocation: every block between {alloc.window[0]} and {alloc.window[1]} bits (uniform "
            f"{alloc.window[0]}-bit is the widest uniform build within the budget)")  # fmt: skip
    return alloc.specs, alloc.predicted


def _job_settings(ckpt: Checkpoint, o: QuantizeOptions, ids: torch.Tensor, specs) -> dict:
    """What a quantize job depends on: a rerun with other settings does not resume it."""
    return {
        "source": _source_fingerprint(ckpt),
        "format": o.fmt,
        "head_bits": o.head_bits,
        "vision": o.vision,
        "calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
        "dtype": str(o.torch_dtype),
        "strategy": hashlib.sha256(repr(specs).encode()).hexdigest()[:16],
        **asdict(o.settings),
    }


def _quantize_decoder(ckpt, model, job: Job, ids, o: QuantizeOptions, specs, shapes, progress, log) -> None:
    """Job steps "embed", "layer.0".."layer.N-1": every decoder layer quantized on the previous one's outputs."""
    device, dtype, n_layers = o.device, o.torch_dtype, len(shapes)
    rows, row_shape = ids.shape[0], (1, ids.shape[1], ckpt.config.text.dim)
    _embed(ckpt, model, job, ids, row_shape, device, dtype)
    names = [f"layers.{i}" for i in range(n_layers)]
    for i, layer in _layers(ckpt, model, job, names, device, dtype, "quantize", progress):
        t0 = time.perf_counter()
        cur, nxt = job.stores(rows, row_shape, dtype)
        middle = job.store("attn", rows, row_shape, dtype)
        ctx = model.context(0, torch.empty(row_shape, dtype=dtype, device=device))
        tensors: dict[str, torch.Tensor] = {}
        emit = _emitter(ckpt, o.format, names[i], tensors)
        io = LayerIO(rows, cur, nxt, device, middle=middle)
        report = quantize_layer(layer, io, ctx, o.settings, specs[i].__getitem__, emit, SOLVERS[o.format.solver])
        layer_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())  # what inspect counts
        avg = layer_bits / sum(out * k for out, k in shapes[i].values())
        info = {"bpw": avg, "rel_error": report.rel_error, "starved_experts": report.starved}
        job.finish(f"layer.{i}", tensors, info, wrote_rows=True)
        msg = f"layer {i + 1}/{n_layers}: {avg:.2f} bits per weight, rel. output error {report.rel_error:.4f}"
        if report.starved:
            msg += f", {len(report.starved)} expert linears with few tokens used the shared Hessian"
        tqdm.write(f"{msg} ({time.perf_counter() - t0:.1f} s)") if progress else log(msg)


def _quantize_head(ckpt: Checkpoint, model, job: Job, o: QuantizeOptions, seeds) -> None:
    """Job step "head": lm_head, on the final norm of the last layer's outputs."""
    device, dtype, t = o.device, o.torch_dtype, ckpt.config.text
    cur, _ = job.stores(o.rows, (1, o.seq_len, t.dim), dtype)
    ckpt.load(model, "norm", device, dtype)
    ckpt.load(model, "lm_head", device, dtype)
    acc = HessianAccumulator(t.dim, device=device)
    with torch.no_grad():
        for r in range(o.rows):
            acc.add(model.norm(cur.read(r).to(device)))
    head_spec = LinearSpec(o.head_bits, o.settings.group_size, seeds(-1, "lm_head"))
    solved = SOLVERS[o.format.solver](model.lm_head.weight.data, acc.hessian(), head_spec, o.settings)
    tensors = {f"{_prefix(ckpt, 'lm_head')}.{k}": v for k, v in o.format.tensors(solved).items()}
    job.finish("head", tensors, {"bits": o.head_bits, "rel_loss": solved.rel_loss})
    unload(model.lm_head)
    unload(model.norm)


def _quantize_vision(ckpt: Checkpoint, model, o: QuantizeOptions, seeds, progress, log):
    """GPTQ for the vision tower's linears (--vision quantize), calibrated on the bundled images, one layer at a time;
    patch conv, norms and the projector stay 16-bit. Returns the packed tensors."""
    from PIL import Image

    from quantkit.calib.sources import default_images
    from quantkit.tokenizer.image import preprocess_image

    s, device, dtype = o.settings, o.device, o.torch_dtype
    vt = model.vision_tower
    images = [preprocess_image(Image.open(p)) for p in default_images()]
    if not images:
        raise QuantkitError("--vision quantize needs calibration images: calib_data/images/ is empty")
    for name in vision_embed():
        ckpt.load(model, name, device, dtype)
    with torch.no_grad():
        h, vctx = vt.embed(images)  # [1, patches of all images, D]
    for name in vision_embed():
        unload(model.get_submodule(name))
    tensors: dict[str, torch.Tensor] = {}
    n = len(model.get_submodule(vision_layers()))
    names = [f"{vision_layers()}.{j}" for j in range(n)]
    rows = MemoryRows([h])  # one row: all images' patches; each layer's float, then quantized, output lands here
    for j, layer in _layers(ckpt, model, None, names, device, dtype, "vision", progress):  # one job step in all
        spec_for = lambda lin, j=j: LinearSpec(s.bits, s.group_size, seeds(-2 - j, lin))  # noqa: E731
        report = quantize_layer(layer, LayerIO(1, rows, rows, device), vctx, s, spec_for,
                                _emitter(ckpt, o.format, names[j], tensors), SOLVERS[o.format.solver])  # fmt: skip
        log(f"vision layer {j + 1}/{n}: {s.bits} bits, rel. error {report.rel_error:.4f}")
    return tensors


def _assemble(
    ckpt: Checkpoint,
    job: Job,
    output: OutputFolder,
    qcfg: dict,
    card: Callable[[int], str],
    max_shard_size: str,
    progress: bool,
    names: str = "vllm",
) -> int:
    """Write the output folder: source tensors in order, each quantized weight replaced by its packed tensors, and
    the model card for the output's size; all inside the temporary folder, so DST appears complete or not at all.
    Tensors are renamed into the `names` naming here only (job files keep one naming), so a resumed job may take
    another --export-names."""
    rename = partial(export_name, ckpt.config.arch, names=names)
    packed: dict[str, list[TensorInfo]] = {}
    for path in job.step_files():
        for name, info in read_header(path)[0].items():
            packed.setdefault(rename(name).rpartition(".")[0], []).append(replace(info, name=rename(name)))
    infos: list[TensorInfo] = []
    for name, info in ckpt.index.infos.items():
        prefix = rename(name).removesuffix(".weight")
        if name.endswith(".weight") and prefix in packed:
            infos += sorted(packed.pop(prefix), key=lambda x: x.name)
        else:
            infos.append(replace(info, name=rename(name)))
    head = rename(ckpt.config.checkpoint_key("lm_head.weight")).removesuffix(".weight")
    untie = ckpt.config.text.tie_word_embeddings and head in packed  # a quantized head of tied embeddings
    if untie:
        infos += sorted(packed.pop(head), key=lambda x: x.name)
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
        if untie:  # the head now has tensors of its own; tied loaders would overwrite them with the embeddings
            (config.get("text_config") or config)["tie_word_embeddings"] = False
            config["tie_word_embeddings"] = False
        write_json(tmp / "config.json", config)
        for f in ckpt.folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (HF_INDEX, "config.json", "README.md"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(card(total))
    return total
