"""quantkit's side of the EXL3 interop rows: `--format exl3 --bits K` (or `--bpw X`) of a converted model, its fp32
logits and 16 greedy tokens.

    python tests/interop/exl3_build.py HF_DIR OUT_DIR OURS.safetensors [--bits 4 | --bpw X] [--names vllm|gptqmodel]
        [--codebook mul1|mcg|3inst] [--head-bits K] [--greedy]

--greedy codes the tiles with the greedy coder of tests/test_exl3.py instead of Viterbi (minutes instead of a
quarter hour for the tiny models on a 2-core CPU): the interop rows check the layout, config and decoding, which do
not depend on how the code was searched. OURS holds {"ids" [1, 24], "logits" [1, 24, V], "greedy" [1, 16]} for
exl3_gptqmodel.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.formats.spec import QuantSettings
from quantkit.quant import trellis
from quantkit.quant.pipeline import quantize
from quantkit.quant.settings import QuantizeOptions
from quantkit.quantized_model import load_any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantkit_logits import greedy  # noqa: E402  (one full forward per token, as the peers run it)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("ours", type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--bpw", type=float, default=None, help="K per linear chosen for this target (else --bits)")
    ap.add_argument("--names", default="vllm", help="--export-names (GPTQModel takes Mixtral and Pixtral as gptqmodel)")
    ap.add_argument("--codebook", default=None, help="the trellis codebook (default: the format's, mul1)")
    ap.add_argument("--head-bits", type=int, default=None, help="code lm_head at K bits too")
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    if args.greedy:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from test_exl3 import _greedy_symbols

        trellis.encode = _greedy_symbols
    opts = QuantizeOptions(QuantSettings(args.bits, None, codebook=args.codebook), fmt="exl3", bpw=args.bpw, rows=4,
                           seq_len=64, force=True, export_names=args.names, head_bits=args.head_bits)  # fmt: skip
    quantize(args.src, args.dst, opts, progress=False, log=lambda _: None)
    model = load_any(args.dst, "cpu", "float32", "torch", progress=False)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).float().contiguous()
        tokens = greedy(model, ids, 16)[:, ids.shape[1] :].contiguous()
    save_file({"ids": ids, "logits": logits, "greedy": tokens}, str(args.ours))


if __name__ == "__main__":
    main()
