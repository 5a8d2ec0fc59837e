"""The quantkit format: the project's own layout (bit planes, segments of mixed widths within a matrix, act order as
an input permutation, an optional Hadamard rotation; formats/packed.py, docs/format.md), which --bpw builds need to
mix widths inside one matrix and which only quantkit loads.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit import __version__
from quantkit.arch.blocks import BLOCK_ROLES, SENSITIVE
from quantkit.errors import QuantkitError
from quantkit.formats.base import Built, OutputFormat, SolvedLinear
from quantkit.formats.gptq import pack_gptq_result
from quantkit.formats.packed import FORMAT_VERSION, stored_bits_for, to_tensors
from quantkit.formats.spec import PER_CHANNEL, Candidate, LinearSpec, QuantSettings
from quantkit.kernels.qlinear import QuantLinear

BASE_BITS = (2, 3, 4, 5, 6, 7, 8)
SALIENT_FRACTION = 0.1


class QuantkitFormat(OutputFormat):
    name = "quantkit"
    help = "our own, mixed bits within a matrix"
    key_tensor = "qmeta"
    markers = frozenset({"qmeta", "segments"})
    header_tensors = frozenset({"qmeta", "segments"})  # tiny: they say how to shape the rest
    rotates = True
    mixed_matrix = True
    # On SmolLM2-135M the knapsack's choices at 2.5-5.5 bpw stored at most 1.95 bits per weight above the target, and
    # the allocations with the candidates above target + 2 (or + 2.5) left out were the same in all 210 linears at
    # each target; at 3.0 that leaves 13 of 19 candidates, 10 of 14 settings of a linear to solve.
    reach = 2.5

    def check(self, s: QuantSettings, bpw: float | None, rotate: bool) -> None:
        super().check(s, bpw, rotate)
        if bpw is not None and s.static_groups:
            raise QuantkitError("--bpw mixes bit widths within a matrix, which needs dynamic groups: drop "
                                "--static-groups")  # fmt: skip

    def candidates(self, block: str, moe: bool) -> list[Candidate]:
        """Uniform widths, 10% salient columns one width up, the sensitive roles one width up, and at 2 and 3 bits
        per-channel grids (so that even the lowest targets leave the allocator a choice: per-channel blocks pay for
        wider ones elsewhere). Not offered, as the knapsack never took them at 2.25-6.0 bits on the real or the
        self-trained model (the measurement's time goes with the table): g32 at 2 and 3 bits (once, at 2.25) and 7
        bits uniform or with the sensitive roles at 8 (7 with 10% salient columns and 8 stay: the top of the range).
        """
        roles = BLOCK_ROLES[block]
        out = []
        for b in BASE_BITS:
            up = min(b + 1, 8)
            if b != 7:
                out.append(Candidate(f"{b}", tuple((r, ((b, 1.0),), None) for r in roles)))
            if b == 8:
                continue
            salient = ((up, SALIENT_FRACTION), (b, 1 - SALIENT_FRACTION))
            out.append(Candidate(f"{b}+salient", tuple((r, salient, None) for r in roles)))
            if b != 7:
                sens = tuple((r, ((up, 1.0),) if r in SENSITIVE[block] else ((b, 1.0),), None) for r in roles)
                out.append(Candidate(f"{b}+{'/'.join(SENSITIVE[block])}", sens))
            if b <= 3:
                out.append(Candidate(f"{b} per-channel", tuple((r, ((b, 1.0),), PER_CHANNEL) for r in roles)))
        return out

    def stored_bits(self, spec: LinearSpec, out_features: int, in_features: int, s: QuantSettings) -> int:
        return stored_bits_for(
            out_features, in_features, spec.bits if isinstance(spec.bits, int) else list(spec.bits), spec.group_size,
            asym=not s.sym_for(spec.bits), act_order=s.act_order, static_groups=s.static_groups,
            had_in=spec.rotate_seed is not None,
        )  # fmt: skip

    def tensors(self, solved: SolvedLinear) -> dict[str, torch.Tensor]:
        return to_tensors(pack_gptq_result(solved.result, had_in=solved.had_in, had_in_block=solved.had_in_block))

    def quantization_config(self, b: Built) -> dict:
        """The settings, and every decoder linear's bits and group size (`modules`)."""
        s = b.settings
        return {
            "quant_method": self.name,
            "format_version": FORMAT_VERSION,
            "bits": s.bits,
            "head_bits": b.head_bits,
            "group_size": s.group_size or -1,
            "act_order": s.act_order,
            "sym": s.sym,
            "damp_percent": s.damp,
            "clip": s.clip,
            "calibration": b.calibration,
            "producer": f"quantkit {__version__}",
            "bpw": b.bpw,
            "rotate": b.rotate,
            "modules": {
                b.export(f"layers.{i}.{n}", b.export_names): {
                    "bits": sp.bits, "group_size": sp.group_size, "sym": s.sym_for(sp.bits)
                }
                for i, layer in enumerate(b.specs)
                for n, sp in layer.items()
            },
        }

    def weight_count(self, prefix: str, index, qcfg: dict) -> int:
        """The qmeta header [version, in, out, ...]."""
        meta = index.get(f"{prefix}.qmeta").tolist()
        return meta[1] * meta[2]

    def measurement_key(self) -> dict:
        return {}  # measurements older than the GPTQ format's candidates are this format's

    def check_config(self, qcfg: dict) -> None:
        if qcfg.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise QuantkitError(f"quantkit format version {qcfg['format_version']} is not supported ({FORMAT_VERSION})")

    def linear(
        self, qcfg: dict, prefix: str, tensors: dict[str, torch.Tensor], backend: str, shape: tuple[int, int] | None
    ) -> nn.Module:
        return QuantLinear.from_tensors("", tensors, backend=backend)
