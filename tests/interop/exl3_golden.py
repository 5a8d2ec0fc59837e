"""Write tests/data/exl3_gptqmodel.safetensors: EXL3 weights as GPTQModel's CPU decoder (`exl3_torch`) decodes them.

Run in GPTQModel's venv (tests/interop/run_gptqmodel.sh makes it):

    ~/.cache/quantkit-interop/venv/bin/python tests/interop/exl3_golden.py tests/data/exl3_gptqmodel.safetensors

For every codebook (3inst, mcg, mul1) and K = 1..8: random trellis words for a 32 x 48 weight (2 x 3 tiles) and
GPTQModel's decoded Ŵ (`_decode_inner_weight`); per codebook also a 128 x 128 linear at K = 3 with random suh / svh
and GPTQModel's full weight (`get_weight_tensor`, fp32). tests/test_exl3.py checks quantkit's decoder against these
bit for bit. Uses GPTQModel's module only to decode; nothing of it is copied into quantkit.
"""

from __future__ import annotations

import sys

import gptqmodel
import torch
from gptqmodel.nn_modules.exllamav3_torch import ExllamaV3TorchLinear
from safetensors.torch import save_file

MULTIPLIERS = {"mcg": 0xCBAC1FED, "mul1": 0x83DCD12D}


def module(trellis: torch.Tensor, book: str, suh=None, svh=None) -> ExllamaV3TorchLinear:
    tensors = {"trellis": trellis}
    if suh is not None:
        tensors |= {"suh": suh, "svh": svh}
    if book in MULTIPLIERS:
        tensors[book] = torch.tensor([MULTIPLIERS[book]], dtype=torch.int64).to(torch.uint32).view(torch.int32)
    tk, tn = trellis.shape[:2]
    return ExllamaV3TorchLinear.from_tensors(in_features=tk * 16, out_features=tn * 16, name="w", tensors=tensors)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for book in ("3inst", "mcg", "mul1"):
        for k in range(1, 9):
            trellis = torch.randint(-(1 << 15), 1 << 15, (2, 3, 16 * k), generator=g, dtype=torch.int32).to(torch.int16)
            m = module(trellis, book)
            assert m._codebook_name() == book and m._bits_per_weight() == k
            out[f"{book}.k{k}.trellis"] = trellis
            out[f"{book}.k{k}.inner"] = m._decode_inner_weight().float().contiguous()
        trellis = torch.randint(-(1 << 15), 1 << 15, (8, 8, 48), generator=g, dtype=torch.int32).to(torch.int16)
        suh = (torch.randn(128, generator=g) * 0.1).half()
        svh = (torch.randn(128, generator=g) * 0.1).half()
        m = module(trellis, book, suh, svh)
        out |= {f"{book}.full.trellis": trellis, f"{book}.full.suh": suh, f"{book}.full.svh": svh,
                f"{book}.full.weight": m.get_weight_tensor(torch.float32).contiguous()}  # fmt: skip
    save_file(out, sys.argv[1], metadata={"gptqmodel": gptqmodel.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main()
