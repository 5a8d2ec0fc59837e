"""`quantkit quantize`: calibration rows -> embeddings -> one decoder layer at a time -> head -> packed output.

Only one decoder layer's weights are ever loaded (the model is built on the meta device and each layer is
materialized from the checkpoint, quantized, saved and freed), and hidden states live in the job's row stores on
disk, read one row at a time; so a 124B model needs one layer plus its Hessians in memory. The job (work dir)
makes the run resumable: rerun the same command after a crash and it continues at the last finished layer.

The steps, by module: plan.py (what the run writes and needs), looper.py (the one loop over the model's units),
passes.py (what --bpw's measurement and the quantization do with each unit), allocate.py (the bits per block),
assemble.py (the output folder); this module runs them in order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from quantkit import STARTED
from quantkit.calib.rows import tokenized_rows
from quantkit.calib.sources import load_calibration
from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.formats.registry import get_format
from quantkit.io.checkpoint import read_json
from quantkit.io.claim import check_space
from quantkit.io.writer import OutputFolder
from quantkit.memory import frozen_heap, map_large_blocks
from quantkit.model.load import Checkpoint, build_model
from quantkit.quant import looper
from quantkit.quant.allocate import allocate, reachable_bpw
from quantkit.quant.assemble import assemble, output_config
from quantkit.quant.capture import LinearSpec
from quantkit.quant.export import model_card
from quantkit.quant.job import (
    Job,
    claimed,
    default_work_dir,
    discard,
    job_settings,
    measurement_fingerprint,
    space_needed,
)
from quantkit.quant.measure import PROBE_BITS, covers
from quantkit.quant.passes import MeasurePass, QuantizePass
from quantkit.quant.plan import QuantPlan, checked_shapes, linear_shapes, plan, with_time
from quantkit.quant.settings import (
    AUTO,
    QuantizeOptions,
    check_against_model,
    check_bpw_reachable,
    group_size_words,
    resolve_group_size,
    rotate_seeds,
)
from quantkit.tokenizer.chat import ChatTokenizer

IMPORT_SECONDS = time.perf_counter() - STARTED  # importing quantkit and this module: a run's start-up


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


def measure(ckpt: Checkpoint, model, ids: torch.Tensor, work: Path, o: QuantizeOptions, progress: bool = True) -> dict:
    """The measurement pass (passes.MeasurePass): every candidate of every block between o.measure_floor and
    o.measure_reach and the probes, resumable in work/measure, saved as work/measurement.json (reusable with
    --measurement for every --bpw target between those it was made for)."""
    fingerprint = measurement_fingerprint(ckpt, ids, o.settings, o.rotate, o.torch_dtype, o.format)
    reach, floor = o.measure_reach, o.measure_floor
    path = work / "measurement.json"
    if path.is_file():
        saved = read_json(path)
        if (saved.get("fingerprint") == fingerprint and saved.get("scope") == "all"  # not an older one-target one
                and covers(saved.get("reach"), reach, saved.get("floor"), floor)):  # fmt: skip
            return saved
    units = looper.model_units(model, head=True, head_step="probe")
    settings = {**fingerprint, "scope": "all", "probe_bits": list(PROBE_BITS), "reach": reach}
    if floor is not None:  # (absent where there is none, so that earlier runs' work folders resume)
        settings["floor"] = floor
    job = Job(work / "measure", settings, looper.job_steps(units), offload_dir=o.offload_dir)
    processor = MeasurePass(ckpt, model, job, ids, o, rotate_seeds(o.rotate))
    looper.run(ckpt, model, job, units, processor, o.device, o.torch_dtype, progress)
    data = {"version": 2, "fingerprint": fingerprint, "scope": "all", "reach": reach, "floor": floor,
            "layers": [job.info(u.step) for u in units if u.kind == "layer"],
            "probe": {"rows": processor.p_rows, "tokens": processor.p_shape[1], "bits": list(processor.widths),
                      "kl": job.info("probe")["kl"]}}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return data


def load_measurement(path: Path, fmt: OutputFormat | str, expected: dict | None = None, n_layers: int | None = None
                     ) -> dict:  # fmt: skip
    """A saved measurement.json; refused when it was made for another format, model or settings, or lacks the
    probes --bpw reads. Whether it holds the candidates a target may use is allocate's check (it knows the table)."""
    fmt = get_format(fmt)
    data = read_json(path)
    made_for = (data.get("fingerprint") or {}).get("format", "quantkit")  # the quantkit format's key names none
    if made_for != fmt.name:
        raise QuantkitError(f"measurement {path} was made for --format {made_for}, not {fmt.name}: measure again "
                            "without --measurement")  # fmt: skip
    layers = data.get("layers")
    if n_layers is not None and (not isinstance(layers, list) or len(layers) != n_layers):
        found = len(layers) if isinstance(layers, list) else 0
        raise QuantkitError(f"measurement {path} covers {found} layers, the model has {n_layers}: measure again")
    probe = data.get("probe") or {}
    if layers and not (isinstance(probe.get("kl"), list) and len(probe["kl"]) == len(layers)):
        raise QuantkitError(f"measurement {path} has no end-to-end probe (an older quantkit made it): measure again")
    if layers and not set(PROBE_BITS) <= set(probe.get("bits") or []):
        raise QuantkitError(f"measurement {path} has no {'/'.join(map(str, PROBE_BITS))}-bit probes (an older quantkit "
                            "measured for one target only): measure again")  # fmt: skip
    fp = data.get("fingerprint")
    if expected is not None and fp != expected:
        diff = sorted(k for k in set(expected) | set(fp or {}) if (fp or {}).get(k) != expected.get(k))
        raise QuantkitError(
            f"measurement {path} was made for another model or other settings (differs in: {', '.join(diff)}); "
            "measure again without --measurement"
        )
    return data


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
    checked = checked_shapes(model, o)
    group_choice, group_why = "", None
    if o.settings.group_size == AUTO:  # resolved once, here: job, measurement and config all see the concrete size
        g, group_why = resolve_group_size(checked)
        o = replace(o, settings=replace(o.settings, group_size=g))
        group_choice = group_size_words(g, group_why) if o.format.grid_options else ""
    check_against_model(o, read_json(src / "config.json"), checked)
    n_layers = ckpt.config.text.n_layers
    shapes = [linear_shapes(model, i) for i in range(n_layers)]
    bpw_range = None
    if o.bpw is not None:
        bpw_range = reachable_bpw(shapes, o.settings, rotate_seeds(o.rotate), o.format)
        check_bpw_reachable(o.bpw, *bpw_range)
        if o.measurement is not None:  # refused now, before any work, if it cannot serve this target
            allocate(load_measurement(o.measurement, o.format, n_layers=n_layers), shapes, o.bpw, o.settings,
                     rotate_seeds(o.rotate), o.format)  # fmt: skip
    the_plan = replace(plan(ckpt, model, o, bpw_range), group_choice=group_choice)
    output = OutputFolder(dst, force=o.force, src=src, work=work)  # validates dst before any work, dry run included
    if o.dry_run:
        return with_time(the_plan, model, o, shapes, ckpt.config.text, IMPORT_SECONDS)
    with frozen_heap():
        check_space(space_needed(dst, work, o.offload_dir, the_plan.output_bytes, o.rows, o.seq_len,
                                 ckpt.config.text.dim))  # fmt: skip
        _run(ckpt, model, o, shapes, dst, output, work, group_choice, group_why, progress, log)
    return the_plan


def _run(ckpt: Checkpoint, model, o: QuantizeOptions, shapes, dst: Path, output: OutputFolder, work: Path,
         group_choice: str, group_why: str | None, progress: bool, log: Callable[[str], None]) -> None:  # fmt: skip
    """The run itself: calibration, --bpw allocation, the model's units (decoder, then head, vision), assembly."""
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
    seeds = rotate_seeds(o.rotate)
    s = o.settings
    if o.bpw is not None:
        specs, predicted = _allocate(ckpt, model, ids, work, o, shapes, seeds, progress, log)
    else:
        predicted = None
        specs = [{n: LinearSpec(s.bits, s.group_size, seeds(i, n)) for n in layer} for i, layer in enumerate(shapes)]
    units = looper.model_units(model, o.head_bits is not None, o.vision == "quantize")
    job = Job(work, job_settings(ckpt, o, ids, specs), looper.job_steps(units), offload_dir=o.offload_dir)
    if job.done:
        layers_done = sum(job.finished(u.step) for u in units if u.kind == "layer")
        log(f"resuming at layer {layers_done}/{t.n_layers}, step {job.next} "
            f"(work dir {job.dir}; --restart discards it)")  # fmt: skip
    processor = QuantizePass(ckpt, model, job, ids, o, seeds, specs=specs, shapes=shapes, progress=progress, log=log)
    looper.run(ckpt, model, job, units, processor, o.device, o.torch_dtype, progress)
    if job.next is not None:
        raise QuantkitError(f"internal: quantize job stopped before step {job.next}")

    qcfg = output_config(ckpt, o, specs, crows.provenance, model.vision_tower is not None, predicted, shapes)

    def card(size: int) -> str:
        return model_card(dst.name, o.format, qcfg, s, crows.provenance, size, o.head_bits, o.bpw, o.rotate,
                          ckpt.config.arch, group_why, o.export_names)  # fmt: skip

    size = assemble(ckpt, job, output, qcfg, card, o.max_shard_size, progress, o.export_names)
    job.cleanup()
    log(f"wrote {dst} ({size / 1e9:.3f} GB)")


def _allocate(ckpt, model, ids, work: Path, o: QuantizeOptions, shapes, seeds, progress, log):
    """--bpw: measure (or reuse --measurement), then choose every block's storage for the target."""
    m_ids = ids[: min(o.measure_rows, o.rows)]
    if o.measurement is not None:
        expected = measurement_fingerprint(ckpt, m_ids, o.settings, o.rotate, o.torch_dtype, o.format)
        meas = load_measurement(o.measurement, o.format, expected, len(shapes))
    else:
        meas = measure(ckpt, model, m_ids, work, o, progress)
        reach, floor = meas.get("reach"), meas.get("floor")
        up_to = "any --bpw target" if reach is None else f"--bpw up to {o.format.target_for(reach):g}"
        if floor is not None and reach is not None:  # the lowest target whose floor is at least this one
            up_to = f"--bpw {floor + (o.format.reach_below or 0.0):g} to {o.format.target_for(reach):g}"
        log(f"measurement: {work / 'measurement.json'} (reuse it with --measurement for {up_to})")
    alloc = allocate(meas, shapes, o.bpw, o.settings, seeds, o.format)
    total = sum(v for layer in alloc.predicted for v in layer.values())
    log(
        f"allocation: {alloc.bpw:.4f} bits per decoder weight for --bpw {o.bpw} "
        f"({alloc.bits:,} bits, {alloc.bits / 8e9:.3f} GB), predicted KL {total:.4g}"
    )
    return alloc.specs, alloc.predicted
