"""CPU prefill and decode tokens/s: quantkit's float model, the same model quantized, and transformers, in one run.

One small random Mistral is built; quantkit runs it in float and again with every decoder linear quantized (RTN,
--bits, group 128, packed in the quantkit format, torch backend, dequantized weights kept in memory as `quantkit run`
does by default). All sides are timed the same way, from outside: a greedy generation of 1 token (the prefill) and
of 1 + N tokens (the prefill plus N decode steps), each the best of --repeats runs. The runs alternate, so on a
shared machine every side sees the same background load and the ratios stay meaningful. --no-dense adds the
quantized model without kept weights (dequantizing on every forward), the path before the weights were kept.
Run: python benchmarks/bench_runtime.py [--layers 8 --dim 512 --prompt-len 256 --new-tokens 64 --threads 2]

--real GPTQ_FOLDER --float FLOAT_FOLDER times a real model instead (default 1 thread, greedy): quantkit's float
model against transformers (fp32), and the GPTQ folder in quantkit (bf16: the int4 CPU kernel; fp32: the exact
kept-weight path) against GPTQModel on the same folder (bf16, each --peer-backend, run in its venv by
benchmarks/peer_decode.py and driven over a pipe, so its runs alternate with quantkit's like the others):
    python benchmarks/bench_runtime.py --real /tmp/rt-bench/gptqmodel4g64 --float /tmp/realmodel/smollm2-hf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from quantkit.formats.packed import pack_linear
from quantkit.kernels.qlinear import QuantLinear
from quantkit.model import generate, load_model
from quantkit.model.modules import swap_linears
from quantkit.quant.gptq import rtn_quantize
from quantkit.quantized_model import keep_dequantized, load_quantized

PEER_SCRIPT = Path(__file__).resolve().with_name("peer_decode.py")
VENV = Path.home() / ".cache/quantkit-interop/venv"
TEXT = (  # the --real prompt, repeated up to --prompt-len tokens: greedy text agrees more across dtypes than noise
    "The printing press changed how knowledge moved through Europe. Before it, books were copied by hand, slowly "
    "and at great cost, so few people owned any. Within fifty years of its invention, millions of volumes had been "
    "printed, and ideas that once took decades to spread could cross the continent in months. "
)


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


class Peer:
    """GPTQModel on a GPTQ folder in its venv (benchmarks/peer_decode.py); peer(ids, k) generates k tokens greedily."""

    def __init__(self, folder: Path, backend: str, threads: int, venv: Path = VENV) -> None:
        cmd = [str(venv / "bin/python"), str(PEER_SCRIPT), str(folder), "--backend", backend]
        cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict:
        """The script's next JSON line (GPTQModel logs to stdout too)."""
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"GPTQModel exited with {self.proc.wait()} (run {PEER_SCRIPT.name} by hand to see why)")

    def __call__(self, ids: list[int], k: int) -> list[int]:
        self.proc.stdin.write(json.dumps({"ids": ids, "k": k}) + "\n")
        self.proc.stdin.flush()
        return self._read()["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def print_table(speeds: dict[str, tuple[float, float]], ratios: list[tuple[str, str, str]]) -> None:
    print(f"{'':50}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, (pre, dec) in speeds.items():
        print(f"{name:50}{pre:15.1f}{dec:15.1f}")
    for label, a, b in ratios:
        print(f"{label:50}{speeds[a][0] / speeds[b][0]:15.2f}{speeds[a][1] / speeds[b][1]:15.2f}")


def real_model(args: argparse.Namespace) -> None:
    """quantkit vs transformers (float) and vs GPTQModel (the same GPTQ folder) on a real model, alternating."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(args.float)(TEXT * args.prompt_len, return_tensors="pt").input_ids
    ids = ids[:, : args.prompt_len]
    prompt = ids[0].tolist()
    ours = load_model(args.float, device="cpu", dtype="float32", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(args.float, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    quant = {d: load_quantized(args.real, "cpu", d, "torch", progress=False) for d in ("bfloat16", "float32")}
    packed = sum(m.int4_bytes > 0 for m in quant["bfloat16"].modules() if isinstance(m, QuantLinear))
    peers = {f"GPTQModel {b}": Peer(args.real, b, args.threads) for b in args.peer_backend}

    def ours_fn(model):
        return lambda k: generate(model, prompt, max_new_tokens=k).output_ids

    def run_reference(k: int) -> list[int]:
        with torch.inference_mode():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                     do_sample=False)  # fmt: skip
        return out[0, args.prompt_len :].tolist()

    runs = {"quantkit float (fp32)": ours_fn(ours), "transformers float (fp32)": run_reference}
    runs |= {"quantkit 4-bit (bf16, int4 kernel)": ours_fn(quant["bfloat16"])}
    runs |= {"quantkit 4-bit (fp32, kept weights)": ours_fn(quant["float32"])}
    runs |= {f"{name} (bf16)": (lambda k, peer=peer: peer(prompt, k)) for name, peer in peers.items()}
    assert runs["quantkit float (fp32)"](8) == run_reference(8), "float tokens differ from transformers"
    tokens = {name: run(1 + args.new_tokens) for name, run in runs.items()}  # also a first warm-up
    speeds = measure(runs, args.prompt_len, args.new_tokens, args.repeats)
    for peer in peers.values():
        peer.close()

    info = next(iter(peers.values())).info if peers else {}
    print(f"model: {args.real} (GPTQ; quantkit's int4 path on {packed} linears), float: {args.float}")
    kernels = ", ".join(f"{name}: {'/'.join(peer.info['kernel'])}" for name, peer in peers.items())
    print(f"CPU, {args.threads} thread(s), torch {torch.__version__}; GPTQModel {info.get('gptqmodel')} (torch "
          f"{info.get('torch')}): {kernels}")  # fmt: skip
    print(f"greedy, prompt {args.prompt_len} tokens of English text, {args.new_tokens} decode tokens, best of "
          f"{args.repeats} alternating runs; decode tok/s = N / (time(1 + N tokens) - time(1 token))")  # fmt: skip
    q16 = "quantkit 4-bit (bf16, int4 kernel)"
    ratios = [("float: quantkit / transformers", "quantkit float (fp32)", "transformers float (fp32)")]
    ratios += [(f"4-bit: quantkit bf16 / {n}", q16, f"{n} (bf16)") for n in peers]
    ratios += [(f"4-bit: quantkit fp32 / {n}", "quantkit 4-bit (fp32, kept weights)", f"{n} (bf16)") for n in peers]
    print_table(speeds, ratios)
    same = {n: sum(a == b for a, b in zip(t, tokens[q16], strict=True)) for n, t in tokens.items() if n != q16}
    print(f"tokens equal to {q16} among the first {1 + args.new_tokens}: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--prompt-len", type=int, help="default 256 (32 with --real)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="default: torch's (1 with --real)")
    p.add_argument("--bits", type=int, default=4, help="bits of the quantized model (RTN, group 128)")
    p.add_argument("--no-dense", action="store_true", help="also time the quantized model without kept weights")
    p.add_argument("--real", type=Path, help="a GPTQ folder of a real model: time it against GPTQModel")
    p.add_argument("--float", type=Path, help="with --real: the float folder it was quantized from")
    p.add_argument("--peer-backend", action="append", help="with --real: GPTQModel backend(s) (auto, gptq_torch_aten, "
                   "torch, ...); default auto and gptq_torch_aten")  # fmt: skip
    args = p.parse_args()
    real = args.real is not None
    if real and args.float is None:
        p.error("--real needs --float (the float folder, for the float comparison)")
    args.peer_backend = args.peer_backend or ["auto", "gptq_torch_aten"]
    args.threads = args.threads or (1 if real else torch.get_num_threads())
    args.prompt_len = args.prompt_len or (32 if real else 256)
    torch.set_num_threads(args.threads)
    if real:
        real_model(args)
        return

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
