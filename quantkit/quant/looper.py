"""The one loop of a quantize run: over the units of a model (embeddings, decoder layers, head, vision tower), each
loaded from the checkpoint, handed to the pass's processor (passes.py: measure, quantize), unloaded and freed, and
recorded as a job step, so a killed pass resumes at the first unfinished one. GPTQModel's looper is the anchor.

Only a unit's own modules are ever in memory; what flows between units (hidden states) lives in the job's row stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm import tqdm

from quantkit.arch.blocks import vision_embed, vision_layers
from quantkit.memory import release
from quantkit.model.load import Checkpoint, unload
from quantkit.quant.job import Job


@dataclass(frozen=True)
class Unit:
    """One step of a pass: `kind` names the processor's method that takes it, `modules` what is loaded for it (in
    that order, passed to the method), `step` the job step it belongs to; a step of several units (the vision
    tower's, whose rows live in memory) is recorded after its last (`ends_step`)."""

    kind: str  # embed, layer, head, vision_embed, vision_layer
    step: str
    modules: tuple[str, ...]
    index: int = 0  # the layer's index (decoder or vision)
    ends_step: bool = True


@dataclass
class Done:
    """What a processor hands back for the job: the step's tensors, its info, whether it wrote the next rows."""

    tensors: dict[str, torch.Tensor] | None = None
    info: dict | None = None
    wrote_rows: bool = False


class Processor(Protocol):
    """A pass (passes.py): `desc` names it on the progress bar; a method per unit kind takes the unit and its loaded
    modules and returns Done."""

    desc: str


def model_units(model, head: bool = False, vision: bool = False, head_step: str = "head") -> list[Unit]:
    """A pass's units in order: embeddings, every decoder layer, then (optionally) the head and the vision tower."""
    n = len(model.layers)
    units = [Unit("embed", "embed", ("embed_tokens",))]
    units += [Unit("layer", f"layer.{i}", (f"layers.{i}",), i) for i in range(n)]
    if head:
        units.append(Unit("head", head_step, ("norm", "lm_head")))
    if vision:
        layers = vision_layers()
        n_vision = len(model.get_submodule(layers))
        units.append(Unit("vision_embed", "vision", vision_embed(), ends_step=False))
        units += [Unit("vision_layer", "vision", (f"{layers}.{j}",), j, j == n_vision - 1) for j in range(n_vision)]
    return units


def job_steps(units: list[Unit]) -> list[str]:
    """The job's named steps, in order (one per step, however many units it has)."""
    return list(dict.fromkeys(u.step for u in units))


def run(ckpt: Checkpoint, model, job: Job, units: list[Unit], processor: Processor, device, dtype,
        progress: bool) -> None:  # fmt: skip
    """Every unit whose step the job has not finished, in order: load, process, unload, free, record."""
    todo = [u for u in units if not job.finished(u.step)]
    desc = processor.desc
    with tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="step", disable=not progress) as bar:
        for u in todo:
            modules = [ckpt.load(model, name, device, dtype) for name in u.modules]
            done = getattr(processor, u.kind)(u, *modules)
            for m in modules:
                unload(m)
            release()
            if u.ends_step:
                job.finish(u.step, done.tensors, done.info, done.wrote_rows)
            bar.update(1)
