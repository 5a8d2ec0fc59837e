"""`quantkit convert`: plan from headers alone, then stream tensor by tensor into HF shards.

Memory is bounded by one tensor plus small buffers: shards are planned from metadata, each shard's header is
written first, and every tensor is read, permuted if it is a q/k projection, cast if asked, written and freed.
The output folder is assembled as a hidden sibling and renamed at the end; the source is only read.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit.arch import Arch, detect_arch, model_dims
from quantkit.convert.hf_config import build_config, generation_config
from quantkit.convert.keymap import TensorMap, expand, match
from quantkit.convert.transforms import permute_rope
from quantkit.errors import QuantkitError
from quantkit.io.checkpoint import NATIVE_INDEX, native_weight_files, read_json
from quantkit.io.claim import Claim
from quantkit.io.reader import DTYPE_NAMES, DTYPES, TensorIndex, TensorInfo, load_tensor
from quantkit.io.writer import OutputFolder, TensorSpec, parse_shard_size, plan_shards, write_json, write_sharded
from quantkit.tokenizer.hf import write_tokenizer_files
from quantkit.tokenizer.source import TokenizerInfo, check_against_params, find_tokenizer_file, read_tokenizer_info

FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
CAST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class ConvertPlan:
    """Everything decided before a byte is written; `summary()` is what --dry-run prints."""

    arch: Arch
    params: dict
    config: dict
    maps: list[TensorMap]
    sources: dict[str, TensorInfo]
    specs: list[TensorSpec]
    shards: list[list[TensorSpec]]
    projector_bias: bool
    tokenizer: TokenizerInfo | None
    part_params: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.part_params.items())
        lines = [
            f"architecture: {self.arch.name} -> {self.arch.hf_class}",
            f"tensors: {len(self.specs)} ({len(self.sources)} in the source)",
            f"parameters: {sum(self.part_params.values()):,} ({parts})",
            f"output: {self.total_bytes / 1e9:.3f} GB in {len(self.shards)} shard(s)",
        ]
        if self.arch.has_vision:
            lines.append(f"projector bias: {'yes' if self.projector_bias else 'no'} (multimodal_projector_bias)")
        tok = self.tokenizer
        lines.append(f"tokenizer: {tok.path.name} ({tok.kind} {tok.version})" if tok else "tokenizer: none found")
        return "\n".join(lines)


def _check_native_index(src: Path, index: TensorIndex) -> None:
    path = src / NATIVE_INDEX
    if not path.is_file():
        return
    listed = set(read_json(path).get("weight_map", {}))
    if listed != set(index.infos):
        extra, absent = sorted(listed - set(index.infos)), sorted(set(index.infos) - listed)
        raise QuantkitError(
            f"{NATIVE_INDEX} disagrees with the shards: {len(extra)} listed but absent {extra[:3]}, "
            f"{len(absent)} present but unlisted {absent[:3]}"
        )


def _resolve_bias(mode: str, params: dict, present: set[str], expected_bias: list[TensorMap]) -> bool:
    """Decide whether the output has projector biases; cross-check params.json in auto mode."""
    if not expected_bias:
        return False
    if present and len(present) != len(expected_bias):
        missing = [m.native for m in expected_bias if m.native not in present]
        raise QuantkitError(f"checkpoint has only some projector biases; missing: {', '.join(missing)}")
    has = bool(present)
    declared = params["vision_encoder"].get("adapter_bias")
    if mode == "auto":
        if declared is not None and bool(declared) != has:
            raise QuantkitError(
                f"params.json says adapter_bias={declared} but the checkpoint has "
                f"{'' if has else 'no '}projector bias tensors; use --projector-bias drop or zeros to choose"
            )
        return has
    return mode == "zeros"


def _tokenizer(src: Path, params: dict) -> TokenizerInfo | None:
    path = find_tokenizer_file(src)
    if path is None:
        return None
    info = read_tokenizer_info(path)
    check_against_params(info, params)
    return info


def _image_token_id(params: dict, tok: TokenizerInfo | None) -> int | None:
    from_params = params.get("vision_encoder", {}).get("image_token_id")
    from_tok = tok.specials.get("[IMG]") if tok else None
    if from_params is not None and from_tok is not None and int(from_params) != from_tok:
        raise QuantkitError(f"params.json image_token_id {from_params} but the tokenizer's [IMG] is {from_tok}")
    return int(from_params) if from_params is not None else from_tok


def plan_conversion(
    params: dict,
    sources: dict[str, TensorInfo],
    *,
    tokenizer: TokenizerInfo | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    projector_bias: str = "auto",
) -> ConvertPlan:
    """Map, check and lay out a conversion from params.json and tensor metadata only (no tensor data)."""
    arch, dims = detect_arch(params), model_dims(params)
    expected = expand(arch, dims)
    maps = match(expected, sources, optional_bias=True)
    expected_bias = [m for m in expected if m.bias]
    present_bias = {m.native for m in maps if m.bias}
    bias = _resolve_bias(projector_bias, params, present_bias, expected_bias)

    cast = CAST[dtype] if dtype else None
    specs, part_params = [], Counter()
    maps = sorted(maps, key=lambda m: (str(sources[m.native].file), sources[m.native].start))
    for m in maps:
        info = sources[m.native]
        if m.bias and not bias:
            continue
        part_params[m.part] += info.numel  # parameters of the output: dropped biases do not count
        out_dtype = cast if cast and info.dtype in FLOAT_DTYPES else info.dtype
        specs.append(TensorSpec(m.hf, out_dtype, m.shape))
    if bias and not present_bias:
        zero_dtype = cast or sources[next(m.native for m in maps if m.part == "projector")].dtype
        specs += [TensorSpec(m.hf, zero_dtype, m.shape) for m in expected_bias]
        part_params["projector"] += sum(math.prod(m.shape) for m in expected_bias)  # the zero biases written
    floats = [sources[m.native].dtype for m in maps if sources[m.native].dtype in FLOAT_DTYPES]
    main_dtype = cast or (Counter(floats).most_common(1)[0][0] if floats else "BF16")
    dtype_name = str(DTYPES[main_dtype]).removeprefix("torch.")

    specials = tokenizer.specials if tokenizer else {}
    config = build_config(
        arch,
        params,
        dims,
        dtype=dtype_name,
        bos_id=specials.get("<s>", 1),
        eos_id=specials.get("</s>", 2),
        image_token_id=_image_token_id(params, tokenizer) if arch.has_vision else None,
        projector_bias=bias,
    )
    shards = plan_shards(specs, parse_shard_size(max_shard_size))  # 0 refused, as quantize does
    return ConvertPlan(arch, params, config, maps, sources, specs, shards, bias, tokenizer, dict(part_params))


def _producer(plan: ConvertPlan):
    by_hf = {m.hf: m for m in plan.maps}

    def produce(spec: TensorSpec) -> torch.Tensor:
        m = by_hf.get(spec.name)
        if m is None:  # a zero projector bias materialized for older loaders
            return torch.zeros(spec.shape, dtype=DTYPES[spec.dtype])
        t = load_tensor(plan.sources[m.native])
        if m.rope_heads:
            t = permute_rope(t, m.rope_heads)
        if DTYPE_NAMES[t.dtype] != spec.dtype:
            t = t.to(DTYPES[spec.dtype])
        return t

    return produce


def convert(
    src: Path,
    dst: Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    projector_bias: str = "auto",
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
) -> ConvertPlan:
    """Convert the Mistral-native checkpoint in src to the Hugging Face layout in dst; returns the plan."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise QuantkitError(f"source folder {src} does not exist")
    if not (src / "params.json").is_file():
        raise QuantkitError(f"no params.json in {src}: not a Mistral-native checkpoint")
    params = read_json(src / "params.json")
    index = TensorIndex(native_weight_files(src))
    _check_native_index(src, index)
    tokenizer = _tokenizer(src, params)
    plan = plan_conversion(
        params,
        index.infos,
        tokenizer=tokenizer,
        max_shard_size=max_shard_size,
        dtype=dtype,
        projector_bias=projector_bias,
    )
    output = OutputFolder(dst, force=force, src=src)  # validates dst before any work, dry run included
    if dry_run:
        return plan
    with Claim(dst, log=lambda msg: print(msg, file=sys.stderr)):  # one run per DST; a dead run's leftovers go
        output = OutputFolder(dst, force=force, src=src, need=plan.total_bytes)  # validates dst before any work
        if tokenizer is None:
            print(f"warning: no tokenizer file in {src}; the output will have none", file=sys.stderr)
        produce = _producer(plan)
        bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
        with output as tmp, bar:
            write_sharded(tmp, plan.shards, produce, on_bytes=bar.update)
            write_json(tmp / "config.json", plan.config)
            text = plan.config.get("text_config", plan.config)
            write_json(tmp / "generation_config.json", generation_config(text["bos_token_id"], text["eos_token_id"]))
            if tokenizer is not None:
                write_tokenizer_files(tokenizer, tmp, vision=plan.arch.has_vision)
    return plan
