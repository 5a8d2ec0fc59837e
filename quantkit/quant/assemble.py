"""The end of a quantize run: config.json's quantization_config as the output format writes it, and the output
folder assembled from the source's tensors and the job's finished steps, written to a temporary folder and renamed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from tqdm import tqdm

from quantkit.arch import export_name
from quantkit.errors import QuantkitError
from quantkit.formats.base import Built
from quantkit.io.checkpoint import HF_INDEX, read_json
from quantkit.io.reader import TensorInfo, load_tensor, read_header
from quantkit.io.writer import OutputFolder, TensorSpec, parse_size, plan_shards, write_json, write_sharded
from quantkit.model.load import Checkpoint
from quantkit.quant.job import Job
from quantkit.quant.passes import module_prefix
from quantkit.quant.settings import QuantizeOptions


def output_config(
    ckpt: Checkpoint, o: QuantizeOptions, specs, provenance: dict, vision: bool = False, predicted=None, shapes=None
) -> dict:
    """config.json's quantization_config, as the output format writes it; a --bpw build also records the
    allocator's predicted KL per layer and block (`allocation`, shown by `inspect --card`) with quantkit's fields."""
    built = Built(
        o.settings, provenance, o.head_bits, o.bpw, o.rotate, specs,
        lambda name, names: module_prefix(ckpt, name, names), o.export_names, vision,
        o.settings.bits if o.vision == "quantize" else None, predicted, shapes,
        (ckpt.config.text.vocab_size, ckpt.config.text.dim) if o.head_bits is not None else None,
    )  # fmt: skip
    qcfg = o.format.quantization_config(built)
    if predicted is not None:
        o.format.own_fields(qcfg)["allocation"] = {
            "objective": "predicted KL: each block's KL probed at 2/3/4 bits, interpolated in its local error",
            "predicted_kl": [{b: round(v, 6) for b, v in layer.items()} for layer in predicted],
        }
    return qcfg


def assemble(
    ckpt: Checkpoint,
    job: Job,
    output: OutputFolder,
    qcfg: dict,
    card: Callable[[int], str],
    max_shard_size: str,
    progress: bool,
    names: str = "vllm",
) -> int:
    """Write the output folder: source tensors in order, each quantized weight replaced by its packed tensors, and
    the model card for the output's size; all inside the temporary folder, so DST appears complete or not at all.
    Tensors are renamed into the `names` naming here only (job files keep one naming), so a resumed job may take
    another --export-names."""
    rename = partial(export_name, ckpt.config.arch, names=names)
    packed: dict[str, list[TensorInfo]] = {}
    for path in job.step_files():
        for name, info in read_header(path)[0].items():
            packed.setdefault(rename(name).rpartition(".")[0], []).append(replace(info, name=rename(name)))
    infos: list[TensorInfo] = []
    for name, info in ckpt.index.infos.items():
        prefix = rename(name).removesuffix(".weight")
        if name.endswith(".weight") and prefix in packed:
            infos += sorted(packed.pop(prefix), key=lambda x: x.name)
        else:
            infos.append(replace(info, name=rename(name)))
    head = rename(ckpt.config.checkpoint_key("lm_head.weight")).removesuffix(".weight")
    untie = ckpt.config.text.tie_word_embeddings and head in packed  # a quantized head of tied embeddings
    if untie:
        infos += sorted(packed.pop(head), key=lambda x: x.name)
    if packed:
        raise QuantkitError(f"internal: quantized tensors with no source weight: {sorted(packed)[:3]}")
    by_name = {i.name: i for i in infos}
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in infos]
    shards = plan_shards(specs, parse_size(max_shard_size))
    total = sum(s.nbytes for s in specs)
    with output as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        write_sharded(tmp, shards, lambda s: load_tensor(by_name[s.name]), on_bytes=bar.update)
        config = read_json(ckpt.folder / "config.json")
        config["quantization_config"] = qcfg
        if untie:  # the head now has tensors of its own; tied loaders would overwrite them with the embeddings
            (config.get("text_config") or config)["tie_word_embeddings"] = False
            config["tie_word_embeddings"] = False
        write_json(tmp / "config.json", config)
        for f in ckpt.folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (HF_INDEX, "config.json", "README.md"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(card(total))
    return total
