"""EXL3 against GPTQ on real linears: relative proxy loss tr(E H Eᵀ) / tr(W H Wᵀ) and stored bits per weight.

The Hessians are real: the inputs of the chosen linears of one decoder layer of a converted model (real_model.py's
SmolLM2-135M-Instruct by default) on calibration text, captured with transformers forward hooks. Each linear is
quantized by our GPTQ (act order, group 64) at 2, 3 and 4 bits and by our EXL3 solver (quant/trellis.py
solve_trellis; dimensions padded to multiples of 128 as EXL3 stores them) at the chosen K; one JSON line per linear:
{method: [relative proxy loss, stored bits per real weight(, seconds)]}. EXL3 encoding is slow on a CPU (minutes
per linear of this size).

    python benchmarks/bench_exl3_linears.py MODEL_DIR --layer 3 --linears self_attn.q_proj,self_attn.k_proj --k 2,3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from quantkit.formats.gptq import gptq_stored_bits
from quantkit.formats.spec import LinearSpec, QuantSettings
from quantkit.model.load import Checkpoint
from quantkit.quant.capture import solve_linear
from quantkit.quant.gptq import proxy_loss
from quantkit.quant.pipeline import _calibration
from quantkit.quant.trellis import solve_trellis

REPO = Path(__file__).resolve().parent.parent


def hessians(model, layer: int, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[x xᵀ] of each linear's inputs over the rows of ids."""
    mods = {n: model.model.layers[layer].get_submodule(n) for n in names}
    sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods.items()}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def add(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] += x.T @ x
            counts[name] += x.shape[0]

        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        for r in range(ids.shape[0]):
            model(ids[r : r + 1])
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a converted model folder (e.g. real_model.py OUT/smollm2-hf)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--linears", default="self_attn.q_proj,self_attn.k_proj")
    ap.add_argument("--k", default="2,3", help="EXL3 bits per weight, comma-separated")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    names = args.linears.split(",")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = _calibration(Checkpoint(args.model), str(REPO / "calib_data/prose_en.txt"), "train", "text", args.rows,
                       args.seq_len, 0).ids  # fmt: skip
    for name, h in hessians(model, args.layer, names, ids).items():
        w = model.model.layers[args.layer].get_submodule(name).weight.data.float()
        row: dict = {"layer": args.layer, "linear": name, "shape": list(w.shape)}
        for bits in (2, 3, 4):
            solved = solve_linear(w, h, LinearSpec(bits, 64), QuantSettings(bits, 64))
            stored = gptq_stored_bits(*w.shape, bits, 64) / w.numel()
            row[f"gptq{bits}_g64"] = [round(proxy_loss(w, solved.weight, h)[1], 5), round(stored, 3)]
        for k in map(int, args.k.split(",")):
            start = time.perf_counter()
            solved = solve_trellis(w, h, LinearSpec(k, None), QuantSettings(k))
            seconds = time.perf_counter() - start
            stored = sum(t.numel() * t.element_size() * 8 for t in solved.tensors.values()) / w.numel()
            row[f"exl3_k{k}"] = [round(solved.rel_loss, 5), round(stored, 3), round(seconds, 1)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
