"""The processors looper.run hands units to: MeasurePass (--bpw's measurement, measure.py) and QuantizePass (the
quantization itself). A method per unit kind (embed, layer, head, vision_embed, vision_layer) gets the unit's loaded
modules and returns what the job records (looper.Done); hidden states flow through the job's row stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from quantkit.arch import export_name
from quantkit.arch.blocks import vision_layers
from quantkit.errors import QuantkitError
from quantkit.formats.base import OutputFormat
from quantkit.model.load import Checkpoint
from quantkit.quant.capture import LayerIO, LinearSpec, MemoryRows, quantize_layer
from quantkit.quant.gptq import HessianAccumulator
from quantkit.quant.job import Job
from quantkit.quant.looper import Done, Unit
from quantkit.quant.measure import PROBE_BITS, PROBE_ROWS, PROBE_TOKENS, measure_layer
from quantkit.quant.settings import QuantizeOptions
from quantkit.quant.solvers import SOLVERS


def module_prefix(ckpt: Checkpoint, model_name: str, names: str = "gptqmodel") -> str:
    """The name of one of our modules in an export's naming (quantkit.arch export_name). Job files and the `dynamic`
    rules' units use GPTQModel's (the rules match both namings); assembly renames to the requested one."""
    return export_name(ckpt.config.arch, ckpt.key(model_name + ".weight"), names).removesuffix(".weight")


def _emitter(ckpt: Checkpoint, fmt: OutputFormat, prefix: str, tensors: dict[str, torch.Tensor]):
    """emit(name, solved) for quantize_layer: the packed tensors of prefix.name into tensors."""

    def emit(name: str, solved) -> None:
        key = module_prefix(ckpt, f"{prefix}.{name}")
        tensors.update({f"{key}.{k}": t for k, t in fmt.tensors(solved).items()})

    return emit


class Pass:
    """What both passes share: the run's rows and settings, and the embeddings step (the calibration rows'
    embeddings into the job's first row store)."""

    desc = "pass"

    def __init__(self, ckpt: Checkpoint, model, job: Job, ids: torch.Tensor, o: QuantizeOptions,
                 seeds: Callable[[int, str], int | None]):  # fmt: skip
        self.ckpt, self.model, self.job, self.ids, self.o, self.seeds = ckpt, model, job, ids, o, seeds
        self.device, self.dtype = o.device, o.torch_dtype
        self.rows, self.row_shape = ids.shape[0], (1, ids.shape[1], ckpt.config.text.dim)

    def embed(self, unit: Unit, embed_tokens) -> Done:
        _, nxt = self.job.stores(self.rows, self.row_shape, self.dtype)
        with torch.no_grad():
            for r in range(self.rows):
                nxt.write(r, self.model.embed(self.ids[r : r + 1]))
        return Done(wrote_rows=True)

    def _context(self, shape):
        return self.model.context(0, torch.empty(shape, dtype=self.dtype, device=self.device))

    def _layer_io(self, middle) -> LayerIO:
        cur, nxt = self.job.stores(self.rows, self.row_shape, self.dtype)
        return LayerIO(self.rows, cur, nxt, self.device, middle=middle)


class QuantizePass(Pass):
    """Every decoder layer quantized on the previous one's (quantized) outputs with its specs, then lm_head on the
    final norm of the last layer's outputs, then the vision tower on the bundled images (patch conv, norms and the
    projector stay 16-bit)."""

    desc = "quantize"

    def __init__(self, *args, specs: list[dict[str, LinearSpec]], shapes: list[dict[str, tuple[int, int]]],
                 progress: bool, log: Callable[[str], None]):  # fmt: skip
        super().__init__(*args)
        self.specs, self.shapes, self.progress, self.log = specs, shapes, progress, log
        self.solve = SOLVERS[self.o.format.solver]
        self._vision: tuple[MemoryRows, object, dict[str, torch.Tensor]] | None = None

    def layer(self, unit: Unit, layer) -> Done:
        t0, i, n_layers = time.perf_counter(), unit.index, len(self.shapes)
        middle = self.job.store("attn", self.rows, self.row_shape, self.dtype)
        tensors: dict[str, torch.Tensor] = {}
        emit = _emitter(self.ckpt, self.o.format, unit.modules[0], tensors)
        report = quantize_layer(layer, self._layer_io(middle), self._context(self.row_shape), self.o.settings,
                                self.specs[i].__getitem__, emit, self.solve)  # fmt: skip
        layer_bits = sum(t.numel() * t.element_size() * 8 for t in tensors.values())  # what inspect counts
        avg = layer_bits / sum(out * k for out, k in self.shapes[i].values())
        msg = f"layer {i + 1}/{n_layers}: {avg:.2f} bits per weight, rel. output error {report.rel_error:.4f}"
        if report.starved:
            msg += f", {len(report.starved)} expert linears with few tokens used the shared Hessian"
        tqdm.write(f"{msg} ({time.perf_counter() - t0:.1f} s)") if self.progress else self.log(msg)
        return Done(tensors, {"bpw": avg, "rel_error": report.rel_error, "starved_experts": report.starved}, True)

    def head(self, unit: Unit, norm, lm_head) -> Done:
        o, dim = self.o, self.ckpt.config.text.dim
        cur, _ = self.job.stores(self.rows, self.row_shape, self.dtype)
        acc = HessianAccumulator(dim, device=self.device)
        with torch.no_grad():
            for r in range(self.rows):
                acc.add(norm(cur.read(r).to(self.device)))
        spec = LinearSpec(o.head_bits, o.settings.group_size, self.seeds(-1, "lm_head"))
        solved = self.solve(lm_head.weight.data, acc.hessian(), spec, o.settings)
        tensors = {f"{module_prefix(self.ckpt, 'lm_head')}.{k}": v for k, v in o.format.tensors(solved).items()}
        return Done(tensors, {"bits": o.head_bits, "rel_loss": solved.rel_loss})

    def vision_embed(self, unit: Unit, *modules) -> Done:
        from PIL import Image

        from quantkit.calib.sources import default_images
        from quantkit.tokenizer.image import preprocess_image

        images = [preprocess_image(Image.open(p)) for p in default_images()]
        if not images:
            raise QuantkitError("--vision quantize needs calibration images: calib_data/images/ is empty")
        with torch.no_grad():
            h, vctx = self.model.vision_tower.embed(images)  # [1, patches of all images, D]
        self._vision = (MemoryRows([h]), vctx, {})  # one row: each layer's float, then quantized, output lands here
        return Done()

    def vision_layer(self, unit: Unit, layer) -> Done:
        s, j = self.o.settings, unit.index
        rows, vctx, tensors = self._vision
        spec_for = lambda lin: LinearSpec(s.bits, s.group_size, self.seeds(-2 - j, lin))  # noqa: E731
        report = quantize_layer(layer, LayerIO(1, rows, rows, self.device), vctx, s, spec_for,
                                _emitter(self.ckpt, self.o.format, unit.modules[0], tensors), self.solve)  # fmt: skip
        n = len(self.model.get_submodule(vision_layers()))
        self.log(f"vision layer {j + 1}/{n}: {s.bits} bits, rel. error {report.rel_error:.4f}")
        return Done(tensors, {"vision_bits": s.bits}) if unit.ends_step else Done()


class MeasurePass(Pass):
    """--bpw's measurement (measure.py): every block's candidates measured on the float layer's inputs, each block
    at each probe width carried on through the later (float) layers, and at the end ("probe", a head unit) the KL
    at the logits of every probe stream against the float model's (each block at each PROBE_BITS width)."""

    desc = "measure"

    def __init__(self, *args):
        super().__init__(*args)
        self.widths = PROBE_BITS
        self.n_layers = self.ckpt.config.text.n_layers
        self.p_rows = min(PROBE_ROWS, self.rows)
        self.p_shape = (1, min(PROBE_TOKENS, self.ids.shape[1]), self.row_shape[2])
        self.streams = 2 * len(self.widths) * self.p_rows  # per layer: each block at each probe width, each probe row

    def _probe_stores(self):
        return self.job.stores(self.streams * self.n_layers, self.p_shape, self.dtype, name="probe")

    def layer(self, unit: Unit, layer) -> Done:
        i, p_rows, n_probes = unit.index, self.p_rows, len(self.widths)
        p_cur, p_nxt = self._probe_stores()
        p_ctx = self._context(self.p_shape)
        with torch.no_grad():  # the earlier blocks' probe streams go on through this (float) layer, a layer's worth
            for start in range(0, self.streams * i, self.streams):  # at a time (1.2x faster than one by one on CPU)
                batch = range(start, start + self.streams)
                out = layer(torch.cat([p_cur.read(j) for j in batch]).to(self.device), p_ctx)
                for j, h in zip(batch, out.split(1), strict=True):
                    p_nxt.write(j, h)

        def probe(block: str, k: int, r: int, h: torch.Tensor) -> None:
            p_nxt.write(((2 * i + (block == "mlp")) * n_probes + k) * p_rows + r, h[:, : self.p_shape[1]])

        io = self._layer_io(self.job.store("attn", self.rows, self.row_shape, self.dtype))
        info = measure_layer(layer, io, self._context(self.row_shape), self.o.settings,
                             lambda name: self.seeds(i, name), self.o.format, probe, p_rows,
                             self.o.measure_reach, self.o.measure_floor)  # fmt: skip
        return Done(None, info, True)

    def head(self, unit: Unit, norm, lm_head) -> Done:
        """Per layer [attn, mlp], per probe width: the mean KL divergence (nats per token) at the logits between the
        float model and the model with only that block quantized at that width, on the probe rows' first tokens."""
        n_probes, p_rows, tokens = len(self.widths), self.p_rows, self.p_shape[1]
        cur, _ = self.job.stores(self.rows, self.row_shape, self.dtype)
        p_cur, _ = self._probe_stores()
        total = [0.0] * (2 * self.n_layers * n_probes)
        with torch.no_grad():
            for r in range(p_rows):
                ref = torch.log_softmax(self.model.head(cur.read(r)[:, :tokens].to(self.device)).float(), -1)
                p = ref.exp()
                for b in range(len(total)):
                    logp = torch.log_softmax(self.model.head(p_cur.read(b * p_rows + r).to(self.device)).float(), -1)
                    total[b] += float(logp.neg_().add_(ref).mul_(p).sum(-1).mean()) / p_rows  # KL(float || probed)
        per_block = [total[k : k + n_probes] for k in range(0, len(total), n_probes)]
        return Done(None, {"kl": [per_block[2 * i : 2 * i + 2] for i in range(self.n_layers)]})
