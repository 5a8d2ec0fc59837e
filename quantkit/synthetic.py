"""Synthetic Mistral-native checkpoints with random weights, for demos, benchmarks and streaming tests.

The tensor list comes from the architecture tables, and tensors are generated and written one at a time, so a
multi-GB checkpoint is produced with memory bounded by one tensor. Run as
`python -m quantkit.synthetic PRESET DST` (presets below) to make one from the command line.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from quantkit.arch import detect_arch, model_dims
from quantkit.convert.keymap import expand
from quantkit.io.checkpoint import NATIVE_INDEX
from quantkit.io.reader import DTYPES
from quantkit.io.writer import TensorSpec, plan_shards, write_json, write_shard

_VISION = {"num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0, "image_token_id": 10}
PRESETS = {
    # Pixtral-Large in miniature: same vocabulary and tokenizer, no projector bias, vision head_dim 88.
    "tiny-pixtral-large": {
        "dim": 256, "n_layers": 4, "head_dim": 64, "hidden_dim": 768, "n_heads": 4, "n_kv_heads": 2,
        "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 32768,
        "vision_encoder": {**_VISION, "hidden_size": 176, "intermediate_size": 352, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_break_token_id": 14, "image_end_token_id": 15,
                           "adapter_bias": False},
    },
    "tiny-mistral": {
        "dim": 256, "n_layers": 4, "head_dim": 64, "hidden_dim": 768, "n_heads": 4, "n_kv_heads": 2,
        "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 32768,
    },
    "tiny-mixtral": {
        "dim": 256, "n_layers": 2, "head_dim": 64, "hidden_dim": 512, "n_heads": 4, "n_kv_heads": 2,
        "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 32768, "moe": {"num_experts": 4, "num_experts_per_tok": 2},
    },
    # About 2 GB in bf16: the quantizer's streaming benchmark.
    "bench-2gb": {
        "dim": 2048, "n_layers": 16, "head_dim": 128, "hidden_dim": 5632, "n_heads": 16, "n_kv_heads": 4,
        "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 32768,
    },
    # About 5.8 GB in bf16: wide enough that single tensors are 100+ MB, like the real models' layers.
    "bench-4gb": {
        "dim": 4096, "n_layers": 12, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
        "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": 32768,
    },
    # One decoder layer at Pixtral-Large's text widths (~1.4 B weights in the layer): GPU quantize timings.
    "pixtral-large-layer": {
        "dim": 12288, "n_layers": 1, "head_dim": 128, "hidden_dim": 28672, "n_heads": 96, "n_kv_heads": 8,
        "rope_theta": 1e9, "norm_eps": 1e-5, "vocab_size": 32768,
    },
}  # fmt: skip


def write_synthetic_native(
    folder: Path,
    params: dict,
    *,
    dtype: str = "BF16",
    seed: int = 0,
    shard_bytes: int = 2 * 10**9,
    tokenizer_file: Path | None = None,
) -> int:
    """Write params.json and random consolidated*.safetensors to folder; returns the bytes of weights written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps = expand(detect_arch(params), model_dims(params))
    has_bias = params.get("vision_encoder", {}).get("adapter_bias", True)
    specs = [TensorSpec(m.native, dtype, m.shape) for m in maps if has_bias or not m.bias]
    gen = torch.Generator().manual_seed(seed)

    def produce(spec: TensorSpec) -> torch.Tensor:
        if spec.name.endswith("norm.weight") or spec.name.endswith("ln_pre.weight"):
            return torch.ones(spec.shape, dtype=DTYPES[dtype])
        return (torch.randn(spec.shape, generator=gen) * 0.02).to(DTYPES[dtype])

    shards = plan_shards(specs, shard_bytes)
    if len(shards) == 1:
        names = ["consolidated.safetensors"]
    else:
        names = [f"consolidated-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {s.name: n for n, shard in zip(names, shards, strict=True) for s in shard}
        write_json(folder / NATIVE_INDEX, {"weight_map": weight_map})
    for name, shard in zip(names, shards, strict=True):
        write_shard(folder / name, shard, produce)
    write_json(folder / "params.json", params)
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, folder / tokenizer_name(Path(tokenizer_file)))
    return sum(s.nbytes for s in specs)


def tokenizer_name(path: Path) -> str:
    """The name Mistral's releases give the file: tekken.json or tokenizer.model.vN[mM]."""
    if path.suffix == ".json":
        return "tekken.json"
    return "tokenizer.model" + ("." + path.name.rsplit(".", 1)[-1] if ".model." in path.name else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("dst", type=Path)
    ap.add_argument("--tokenizer", type=Path, help="a Mistral tokenizer file to place next to the weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = write_synthetic_native(args.dst, PRESETS[args.preset], seed=args.seed, tokenizer_file=args.tokenizer)
    print(f"wrote {args.dst} ({n / 1e9:.2f} GB of weights)")


if __name__ == "__main__":
    main()
