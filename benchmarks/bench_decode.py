"""Decode tokens/s of a few layers of Pixtral-Large's decoder at ~3.0 bpw, eager and captured, projected to 88 layers.

A random model of Mistral-Large-2's width (hidden 12288, MLP 28672, 96 query / 8 KV heads of 128, vocab 32768) is
built directly on the device with --layers decoder layers: every linear (lm_head included, at 6 bits) is a
QuantLinear of random codes with act order, group 128, and a 3/2-bit column mix that stores --bpw bits per weight
(scales counted). Each decode mode ("eager": a Python forward per token; "graph": the DecodeStep captured as a CUDA
graph; "static": the same step uncaptured) generates --new-tokens after a --prompt-len prompt, best of --repeats.
Timing the model with all its layers and with half of them separates the per-layer time from the fixed per-token
cost (embedding, head, sampling), which projects the step to --project-layers layers; the roofline is those
layers' weight bytes over the GPU's spec bandwidth (quantkit.model.roofline).

--count prints the ops launched per decoder layer per decoded token instead: aten ops (a TorchDispatchMode counter;
on a GPU most are one kernel each) and Triton kernel launches, counted inside layer 0 during one decode step.
--dry runs everything that needs no GPU on a tiny model on CPU (gpu_check.sh --dry; tests/test_gpu_check.py).
Run: python benchmarks/bench_decode.py [--layers 4 --bpw 3.0 --modes eager graph] | --count | --dry
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from quantkit.formats import stored_bits
from quantkit.formats.packed import PackedLinear, Segment, plane_widths
from quantkit.kernels.qlinear import QuantLinear
from quantkit.model import roofline
from quantkit.model.config import ModelConfig, TextConfig
from quantkit.model.generate import generate
from quantkit.model.modules import swap_linears
from quantkit.model.text import Transformer
from quantkit.quantized_model import fuse_projections, keep_dequantized

GROUP = 128


def mixed_layout(k: int, bpw: float) -> list[tuple[int, int]]:
    """[(hi bits, cols), (lo bits, cols)] whose codes plus fp16 group scales average bpw bits per weight."""
    code_bits = bpw - 16 / GROUP
    lo = max(2, min(7, int(code_bits)))
    hi_cols = round((code_bits - lo) * k / GROUP) * GROUP
    hi_cols = max(0, min(k, hi_cols))
    layout = [(lo + 1, hi_cols), (lo, k - hi_cols)]
    return [(b, c) for b, c in layout if c > 0]


def random_linear(
    n: int, k: int, layout: list[tuple[int, int]], device: str, backend: str, perm: torch.Tensor
) -> QuantLinear:
    segments = []
    for bits, cols in layout:
        planes = [torch.randint(-(2**31), 2**31 - 1, (cols * w // 32, n), dtype=torch.int32, device=device)
                  for w in plane_widths(bits)]
        segments.append(Segment(bits, cols, planes))
    scales = (torch.rand(k // GROUP, n, device=device) * 2e-3).half()
    return QuantLinear(PackedLinear(k, n, GROUP, segments, scales, None, perm), backend=backend)


def build(args: argparse.Namespace) -> Transformer:
    """The random quantized model on args.device, in args.dtype; float tensors never exist for the linears."""
    t = TextConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                   head_dim=args.head_dim, ffn_dim=args.ffn, vocab_size=args.vocab, norm_eps=1e-5, rope_theta=1e6,
                   max_seq_len=args.prompt_len + args.new_tokens + 8)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = Transformer(ModelConfig("mistral", t))
    torch.manual_seed(0)

    perms: dict[str, torch.Tensor] = {}  # linears reading one input share its act-order permutation, as GPTQ's do

    def factory(name: str, linear: nn.Linear) -> QuantLinear:
        k = linear.in_features
        layout = [(6, k)] if name == "lm_head" else mixed_layout(k, args.bpw)
        site = name if name.endswith(("o_proj", "down_proj", "lm_head")) else name.rsplit(".", 1)[0]
        perm = perms.setdefault(site, torch.randperm(k, device=args.device).int())
        return random_linear(linear.out_features, k, layout, args.device, args.backend, perm)

    swap_linears(model, factory)
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                init = torch.ones if name == "weight" and "Norm" in type(mod).__name__ else torch.randn
                mod.register_parameter(name, nn.Parameter(init(p.shape, device=args.device, dtype=dtype),
                                                          requires_grad=False))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(0.02)
    if args.fuse:  # as load_quantized does
        fuse_projections(model)
    keep_dequantized(model, enabled=args.keep_dequantized)  # torch backend only
    return model.eval()


def linear_bpw(model: nn.Module) -> float:
    qs = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith("layers.")]
    return sum(stored_bits(m.packed) for m in qs) / sum(m.in_features * m.out_features for m in qs)


def decode_seconds(model: Transformer, args: argparse.Namespace, mode: str) -> float:
    """Best seconds per decoded token over --repeats generations (after one warm-up generation)."""
    prompt = [3 + i % (args.vocab - 3) for i in range(args.prompt_len)]
    best = float("inf")
    for i in range(args.repeats + 1):
        g = generate(model, prompt, max_new_tokens=args.new_tokens, decode=mode)
        if i:
            best = min(best, g.decode_seconds / (len(g.output_ids) - 1))
    return best


def bench(args: argparse.Namespace) -> None:
    model = build(args)
    layers = model.layers
    half = max(1, args.layers // 2)
    layer_bytes = sum(t.numel() * t.element_size() for t in layers[0].state_dict().values())
    head_bytes = sum(t.numel() * t.element_size() for p in ("norm", "lm_head")
                     for t in model.get_submodule(p).state_dict().values())
    device = model.norm.weight.device
    bandwidth = roofline.device_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; spec bandwidth {bandwidth / 1e9 if bandwidth else 'unknown'} GB/s; "
          f"dim {args.dim}, ffn {args.ffn}, {args.layers} layers, decoder linears {linear_bpw(model):.3f} bpw "
          f"(layout {mixed_layout(args.dim, args.bpw)} per 12288 columns), lm_head 6-bit, {args.dtype}, "
          f"{layer_bytes / 1e9:.3f} GB per layer")
    print(f"{'mode':<8}{'tok/s ' + str(args.layers) + 'L':>12}{'ms/layer':>10}{'fixed ms':>10}"
          f"{'tok/s ' + str(args.project_layers) + 'L':>13}{'roofline':>10}{'fraction':>10}")
    for mode in args.modes:
        full = decode_seconds(model, args, mode)
        model.layers = layers[:half]
        part = decode_seconds(model, args, mode)
        model.layers = layers
        per_layer = (full - part) / (args.layers - half) if args.layers > half else full
        fixed = max(0.0, full - args.layers * per_layer)
        projected = fixed + args.project_layers * per_layer
        line = f"{mode:<8}{1 / full:12.2f}{per_layer * 1e3:10.3f}{fixed * 1e3:10.3f}{1 / projected:13.2f}"
        if bandwidth:
            roof = (args.project_layers * layer_bytes + head_bytes) / bandwidth
            line += f"{1 / roof:10.1f}{roof / projected:10.0%}"
        print(line, flush=True)


class OpCounter(TorchDispatchMode):
    """Counts aten ops while `active` is set, and separately those that are not views (views launch no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.active, self.ops, self.views = False, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops.append(str(func.overloadpacket.__name__))
            self.views += bool(func.is_view)
        return func(*args, **(kwargs or {}))


def count(args: argparse.Namespace) -> dict[str, int]:
    """Ops launched in decoder layer 0 for one decoded token: aten ops and Triton launches, for each mode."""
    from quantkit.kernels import triton_dequant as td

    model = build(args)
    real = td._qmm
    triton_launches = [0]
    counter = OpCounter()

    class Counted:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                active = counter.active
                triton_launches[0] += active
                counter.active = False  # the interpreter's own tensor ops (CPU) are not launches
                try:
                    return real[grid](*a, **kw)
                finally:
                    counter.active = active

            return launch

    def on(*_):
        counter.active = True

    def off(*_):
        counter.active = False

    model.layers[0].register_forward_pre_hook(on)
    model.layers[0].register_forward_hook(off)
    def layer0(mode: str, new_tokens: int) -> tuple[collections.Counter, int, int]:
        counter.ops.clear()
        counter.views = 0
        triton_launches[0] = 0
        generate(model, [3, 4, 5], max_new_tokens=new_tokens, decode=mode)
        return collections.Counter(counter.ops), counter.views, triton_launches[0]

    out = {}
    td._qmm = Counted()
    try:
        with counter:
            for mode in args.modes:  # (prefill + one decode step) - (prefill alone) = one decode step
                (ops1, views1, tri1), (ops2, views2, tri2) = layer0(mode, 1), layer0(mode, 2)
                ops = ops2 - ops1
                aten, views, tri = sum(ops.values()), views2 - views1, tri2 - tri1
                out[mode] = aten + tri
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
                print(f"{mode:<8} per decoder layer per decoded token: {aten} aten ops ({aten - views} not views) + "
                      f"{tri} Triton launches (backend {args.backend}, {args.device}); most frequent: {top}",
                      flush=True)
    finally:
        td._qmm = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--project-layers", type=int, default=88)
    ap.add_argument("--dim", type=int, default=12288)
    ap.add_argument("--ffn", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=96)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    ap.add_argument("--modes", nargs="+", default=None, choices=["eager", "static", "graph"])
    ap.add_argument("--no-keep-dequantized", dest="keep_dequantized", action="store_false",
                    help="torch backend: dequantize on every forward (the path before weights were kept)")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false", help="q/k/v and gate/up as separate matmuls")
    ap.add_argument("--reduce", choices=["atomic", "fixup"], help="split-K reduction for every config entry")
    ap.add_argument("--count", action="store_true", help="count ops per decoder layer per token instead of timing")
    ap.add_argument("--dry", action="store_true", help="a tiny model on CPU: what can be checked without a GPU")
    args = ap.parse_args()
    if args.dry:
        args.device, args.dtype = "cpu", "float32"
        args.dim, args.ffn, args.heads, args.kv_heads, args.head_dim, args.vocab = 256, 768, 4, 1, 64, 512
        args.layers, args.prompt_len, args.new_tokens, args.repeats = 2, 8, min(args.new_tokens, 8), 1
    args.modes = args.modes or (["eager", "graph"] if args.device.startswith("cuda") else ["eager", "static"])
    if args.reduce:  # the configs are read once and cached: set the key in the cached entries
        from quantkit.kernels.config import load_config

        gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
        for entry in load_config(gpu)["skinny"] + load_config(gpu)["tiled"]:
            entry["reduce"] = args.reduce
    t0 = time.time()
    if args.count:
        count(args)
    else:
        bench(args)
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
