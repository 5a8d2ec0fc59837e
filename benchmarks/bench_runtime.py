"""CPU prefill and decode tokens/s: quantkit's float model, the same model quantized, and transformers, in one run.

One small random Mistral is built; quantkit runs it in float and again with every decoder linear quantized (RTN,
--bits, group 128, packed in the quantkit format, torch backend, dequantized weights kept in memory as `quantkit run`
does by default). All sides are timed the same way, from outside: a greedy generation of 1 token (the prefill) and
of 1 + N tokens (the prefill plus N decode steps), each the best of --repeats runs. The runs alternate, so on a
shared machine every side sees the same background load and the ratios stay meaningful. --no-dense adds the
quantized model without kept weights (dequantizing on every forward), the path before the weights were kept.
Run: python benchmarks/bench_runtime.py [--layers 8 --dim 512 --prompt-len 256 --new-tokens 64 --threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from quantkit.formats.packed import pack_linear
from quantkit.kernels.qlinear import QuantLinear
from quantkit.model import generate, load_model
from quantkit.model.modules import swap_linears
from quantkit.quant.gptq import rtn_quantize
from quantkit.runtime import keep_dequantized


def build_folder(folder: Path, args: argparse.Namespace):
    """A random Mistral-Large-shaped model (GQA 4:1, SwiGLU), saved in the HF layout convert writes."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=32768,
        hidden_size=args.dim,
        intermediate_size=args.dim * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.dim // 64,
        num_key_value_heads=max(1, args.dim // 256),
        head_dim=64,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    return model


def quantized_copy(folder: Path, bits: int, keep: bool):
    """quantkit's model from folder with every decoder linear replaced by an RTN-quantized QuantLinear."""
    model = load_model(folder, device="cpu", dtype="float32", progress=False)

    def factory(name: str, linear: torch.nn.Linear):
        if not name.startswith("layers."):
            return None
        r = rtn_quantize(linear.weight.data, bits, 128)
        return QuantLinear(pack_linear(r.q, r.scales, r.zeros, 128, bits), backend="torch")

    swap_linears(model, factory)
    keep_dequantized(model, enabled=keep)
    return model


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(runs: dict, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (prefill tokens/s, decode tokens/s)} where runs[name](k) is a greedy generation of k tokens."""
    best = {name: [float("inf"), float("inf")] for name in runs}
    for run in runs.values():
        run(2)  # warm-up
    for _ in range(repeats):
        for i, k in enumerate((1, 1 + new_tokens)):
            for name, run in runs.items():
                best[name][i] = min(best[name][i], seconds(lambda run=run, k=k: run(k)))
    return {n: (prompt_len / p, new_tokens / max(f - p, 1e-9)) for n, (p, f) in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--bits", type=int, default=4, help="bits of the quantized model (RTN, group 128)")
    p.add_argument("--no-dense", action="store_true", help="also time the quantized model without kept weights")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        reference = build_folder(Path(tmp), args)
        ours = load_model(Path(tmp), device="cpu", dtype="float32", progress=False)
        quant = quantized_copy(Path(tmp), args.bits, keep=True)
        slow = quantized_copy(Path(tmp), args.bits, keep=False) if args.no_dense else None
    n_params = sum(t.numel() for t in reference.parameters())
    ids = torch.randint(1000, 30000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))

    def ours_fn(model):
        return lambda k: generate(model, ids[0].tolist(), max_new_tokens=k)

    def run_reference(k: int):
        with torch.inference_mode():
            return reference.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    runs = {"quantkit float": ours_fn(ours), f"quantkit {args.bits}-bit": ours_fn(quant), "transformers": run_reference}
    if slow is not None:
        runs[f"{args.bits}-bit, no kept w"] = ours_fn(slow)
    assert runs["quantkit float"](8).output_ids == run_reference(8)[0, args.prompt_len :].tolist(), "tokens differ"
    speeds = measure(runs, args.prompt_len, args.new_tokens, args.repeats)

    print(
        f"model: Mistral-like, {args.layers} layers, dim {args.dim}, {n_params / 1e6:.0f}M params, fp32, CPU, "
        f"{args.threads} threads, torch {torch.__version__}; quantized: RTN {args.bits}-bit g128, torch backend"
    )
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} decode tokens, best of {args.repeats}")
    print(f"{'':22}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, (pre, dec) in speeds.items():
        print(f"{name:22}{pre:15.1f}{dec:15.1f}")
    (f_pre, f_dec), (q_pre, q_dec), (r_pre, r_dec) = (speeds[n] for n in list(runs)[:3])
    print(f"{'quantized / float':22}{q_pre / f_pre:15.2f}{q_dec / f_dec:15.2f}")
    print(f"{'float / transformers':22}{f_pre / r_pre:15.2f}{f_dec / r_dec:15.2f}")


if __name__ == "__main__":
    main()
