"""The EXL3 format (ExLlamaV3's trellis code, formats/exl3.py): K = 1..8 bits per weight per linear, coded by our
own encoder (quant/trellis.py), one K for every linear (--bits K) or one per linear chosen by --bpw. Stored as
exllamav3 stores it: `trellis` int16, `suh` / `svh` fp16 per linear, dimensions padded to multiples of 128, the
codebook mul1 unless --codebook says mcg or 3inst (flagged per linear by an `mul1` / `mcg` scalar int32 tensor holding
the codebook's multiplier; 3INST has none), and a `quantization_config` with exllamav3's fields and the
`tensor_storage` map GPTQModel reads (tests/interop: GPTQModel's torch EXL3 kernel loads our folders). quantkit
loads it with a plain-torch linear (kernels/exl3_linear.py).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit import __version__
from quantkit.arch.blocks import BLOCK_ROLES, SHARED_INPUT
from quantkit.errors import QuantkitError
from quantkit.formats import exl3
from quantkit.formats.base import Built, OutputFormat, SolvedLinear
from quantkit.formats.exl3 import SIGMA_REG, padded
from quantkit.formats.gptq_format import GPTQMODEL_OTHER_NAMES, GPTQMODEL_REFUSES
from quantkit.formats.spec import Candidate, LinearSpec, QuantSettings
from quantkit.kernels.exl3_linear import Exl3Linear


class Exl3Format(OutputFormat):
    name = "exl3"
    help = "ExLlamaV3's trellis-coded weights, K bits per weight and no group scales (CPU: slow to encode)"
    key_tensor = "trellis"
    markers = frozenset({"trellis", "suh", "svh"})
    solver = "trellis"
    method = "EXL3 trellis code by quantkit's own encoder, Hadamard on both sides, LDLQ"
    grid_options = False  # no groups, act order, grids or clipping; damped as exllamav3 damps (exl3.SIGMA_REG)
    parts = frozenset({"decoder", "head"})  # tensor_storage lists the decoder's linears and lm_head (--head-bits)
    widths = (1, 2, 3, 4, 5, 6, 7, 8)  # K, as the format defines it
    reach = 1.5  # --bpw 3.0 measures and chooses K = 2..4 per linear: 3 trellis encodes each, not 8
    reach_below = 1.5  # K = 1 only for targets up to 2.5 (never a floor above the probes' 2 bits: measure.floor_for)
    codebooks = (exl3.DEFAULT_CODEBOOK, *(b for b in exl3.CODEBOOKS if b != exl3.DEFAULT_CODEBOOK))

    def candidates(self, block: str, moe: bool) -> list[Candidate]:
        """K bits per linear, 1 to 8: the roles that read one input (q/k/v, gate/up) at one K, the other (o, down)
        at its own; an MoE block's experts all at one K. (exllamav3 chooses K per tensor by a heuristic; here the
        measured errors and the exact knapsack choose.)"""
        roles = BLOCK_ROLES[block]
        if moe and block == "mlp":
            return [Candidate(f"exl3 {k}", tuple((r, ((k, 1.0),), None) for r in roles)) for k in self.widths]
        shared = SHARED_INPUT[block]
        return [
            Candidate(f"exl3 {a}/{k}", tuple((r, ((a if r in shared else k, 1.0),), None) for r in roles))
            for a in self.widths
            for k in self.widths
        ]

    def settings_rows(self, s: QuantSettings, rotate: bool, group_why: str | None = None) -> list[tuple[str, object]]:
        """The encoder's settings: its damping (exllamav3's sigma_reg) and codebook."""
        return [("Damp", f"{SIGMA_REG} (fraction of the mean Hessian diagonal, exllamav3's sigma_reg)"),
                ("Codebook", s.codebook or exl3.DEFAULT_CODEBOOK)]  # fmt: skip

    def settings_words(self, s: QuantSettings) -> str:
        return f"codebook {s.codebook or exl3.DEFAULT_CODEBOOK}"

    def stored_bits(self, spec: LinearSpec, out_features: int, in_features: int, s: QuantSettings) -> int:
        """The padded trellis at K bits per weight, suh and svh in fp16, and the codebook's int32 flag (if any)."""
        n_out, n_in = padded(out_features), padded(in_features)
        flag = 32 * ((s.codebook or exl3.DEFAULT_CODEBOOK) in exl3.FLAGS)
        return n_out * n_in * spec.bits + 16 * (n_out + n_in) + flag

    def tensors(self, solved: SolvedLinear) -> dict[str, torch.Tensor]:
        return dict(solved.tensors)

    def quantization_config(self, b: Built) -> dict:
        """exllamav3's fields (quant_method, bits, head_bits, calibration rows/cols, out_scales, codebook; not its
        `version`, which GPTQModel takes for a format name), `format` for GPTQModel, `tensor_storage` per quantized
        linear (the decoder's, and lm_head with --head-bits), and quantkit's own fields under "quantkit"."""
        storage, sizes = {}, {}  # sizes: each linear's [out, in] before padding (quantkit's, for inspect)
        book = b.settings.codebook or exl3.DEFAULT_CODEBOOK
        flag = {book: ([], "int32")} if book in exl3.FLAGS else {}
        multiplier = {f"{book}_multiplier": exl3.FLAGS[book]} if book in exl3.FLAGS else {}
        linears = [(f"layers.{i}.{n}", shape, b.specs[i][n].bits)
                   for i, layer in enumerate(b.shapes or []) for n, shape in layer.items()]  # fmt: skip
        if b.head_shape is not None:
            linears.append(("lm_head", b.head_shape, b.head_bits))  # exllamav3 codes its head at 6 bits by default
        for name, (n_out, n_in), k in linears:
            key = b.export(name, b.export_names)
            shapes = {"trellis": ([padded(n_in) // 16, padded(n_out) // 16, 16 * k], "int16"),
                      "suh": ([padded(n_in)], "float16"), "svh": ([padded(n_out)], "float16"), **flag}  # fmt: skip
            storage[key] = {
                "stored_tensors": {f"{key}.{t}": {"shape": s, "torch_dtype": d} for t, (s, d) in shapes.items()},
                "quant_format": self.name,
                "bits_per_weight": k,
                **multiplier,  # as exllamav3's tensor map records the codebook
            }
            sizes[key] = [n_out, n_in]
        return {
            "quant_method": self.name,
            "format": self.name,  # GPTQModel reads a `version` field as its format name: name it here instead
            "bits": b.bpw if b.bpw is not None else b.settings.bits,  # as exllamav3: the decoder's target bitrate
            "head_bits": b.head_bits,  # None: lm_head kept 16-bit (GPTQModel refuses 16 here)
            "calibration": {"rows": b.calibration.get("rows"), "cols": b.calibration.get("seq_len")},
            "out_scales": "always",
            "codebook": book,
            "tensor_storage": storage,
            "quantkit": {"calibration": b.calibration, "shapes": sizes, "producer": f"quantkit {__version__}"},
        }

    def weight_count(self, prefix: str, index, qcfg: dict) -> int:
        """The linear's own size (recorded under quantkit.shapes), else the padded trellis's."""
        shape = self.own_fields(qcfg).get("shapes", {}).get(prefix)
        if shape is not None:
            return shape[0] * shape[1]
        tiles_in, tiles_out, _ = index.infos[f"{prefix}.trellis"].shape
        return tiles_in * tiles_out * exl3.TILE * exl3.TILE

    def own_fields(self, qcfg: dict) -> dict:
        return qcfg.get("quantkit") or {}

    def loading_notes(self, arch: str | None, qcfg: dict, names: str) -> str:
        """Which loaders take the folder: quantkit; GPTQModel's CPU EXL3 kernel unless a width is padded (it
        refuses those) or the names are not its own; ExLlamaV3 / TabbyAPI by layout, not yet run here."""
        shapes = (qcfg.get("quantkit") or {}).get("shapes") or {}
        ragged = sorted(n for n, shape in shapes.items() if any(d % 128 for d in shape))
        gptqmodel = ("GPTQModel (7.7, checked on CPU): `pip install gptqmodel`, then "
                     '`GPTQModel.load("DIR", backend=BACKEND.EXL3_TORCH)`.')  # fmt: skip
        if (arch, names) in GPTQMODEL_REFUSES:
            gptqmodel = GPTQMODEL_OTHER_NAMES
        elif ragged:
            gptqmodel = (f"GPTQModel: refuses this folder: its EXL3 kernel takes widths that are multiples of 128, "
                         f"and {ragged[0]} is {shapes[ragged[0]]} (stored padded, as exllamav3 pads).")  # fmt: skip
        lines = [
            "- quantkit: `quantkit run DIR`, `quantkit eval DIR` or `quantkit serve DIR`.",
            f"- {gptqmodel}",
            "- ExLlamaV3 / TabbyAPI: the tensor names, layout and `quantization_config` fields exllamav3's converter "
            "writes; not yet run on them.",
        ]
        return "## Loading\n\nEXL3, ExLlamaV3's trellis-coded format:\n\n" + "\n".join(lines) + "\n"

    def check_config(self, qcfg: dict) -> None:
        if qcfg.get("codebook", "3inst") not in exl3.CODEBOOKS:
            raise QuantkitError(f"EXL3 codebook {qcfg.get('codebook')!r} is not supported "
                                f"({', '.join(exl3.CODEBOOKS)})")  # fmt: skip

    def linear(
        self, qcfg: dict, prefix: str, tensors: dict[str, torch.Tensor], backend: str, shape: tuple[int, int] | None
    ) -> nn.Module:
        missing = sorted(self.markers - tensors.keys())
        if missing:
            raise QuantkitError(f"{prefix}: EXL3 tensors {', '.join(missing)} are missing")
        trellis = tensors["trellis"]
        k = exl3.bits_per_weight(trellis)
        n_in, n_out = trellis.shape[0] * exl3.TILE, trellis.shape[1] * exl3.TILE
        if tensors["suh"].shape != (n_in,) or tensors["svh"].shape != (n_out,) or n_in % 128 or n_out % 128:
            raise QuantkitError(f"{prefix}: EXL3 trellis {list(trellis.shape)} (K = {k}) does not match suh "
                                f"{list(tensors['suh'].shape)} / svh {list(tensors['svh'].shape)}")  # fmt: skip
        out_f, in_f = shape or (n_out, n_in)
        if padded(out_f) != n_out or padded(in_f) != n_in:
            raise QuantkitError(f"{prefix}: EXL3 tensors are for a [{n_out}, {n_in}] (padded) linear, the model's is "
                                f"[{out_f}, {in_f}]")  # fmt: skip
        return Exl3Linear(tensors, out_f, in_f, exl3.codebook_of(tensors))
