"""Write the Hugging Face tokenizer files for a native Mistral tokenizer.

tokenizer.json is built by us (see backend.py) and loaded by transformers as-is through the generic
PreTrainedTokenizerFast class: model-specific classes such as LlamaTokenizerFast rebuild their own pipeline in
transformers 5 and would drop ours. The native file is copied too, for our runtime and vLLM's mistral mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.tokenizer.backend import build_backend
from quantkit.tokenizer.image import CLIP_MEAN, CLIP_STD
from quantkit.tokenizer.source import TokenizerInfo
from quantkit.tokenizer.templates import chat_template, supported_versions


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def special_tokens_map(info: TokenizerInfo) -> dict[str, str]:
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if "<pad>" in info.specials:
        tokens["pad_token"] = "<pad>"
    return tokens


def processor_files(info: TokenizerInfo) -> dict[str, dict]:
    """preprocessor_config.json and processor_config.json for PixtralImageProcessor / PixtralProcessor."""
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor",
        "processor_class": "PixtralProcessor",
        "do_resize": True,
        "size": {"longest_edge": info.max_image_size},
        "patch_size": {"height": info.patch_size, "width": info.patch_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": info.patch_size,
        "spatial_merge_size": info.spatial_merge_size,
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    return {"preprocessor_config.json": preprocessor, "processor_config.json": processor}


def write_tokenizer_files(info: TokenizerInfo, out_dir: Path, vision: bool = True) -> None:
    """tokenizer.json, tokenizer_config.json (with chat_template), special_tokens_map.json, chat_template.jinja,
    the Pixtral processor configs, and a copy of the native tokenizer file.

    Images (processor files, a template that accepts them) need a multimodal tokenizer and a model with a vision
    tower (`vision`): a text-only model may come with a multimodal tokenizer file (v7m1, image-enabled tekken)."""
    if info.version not in supported_versions():
        raise QuantkitError(f"{info.path.name}: tokenizer version {info.version} is not supported (v1, v3, v7)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend(info)
    if backend.get_vocab_size() != info.vocab_size:
        raise QuantkitError(f"{info.path.name}: built {backend.get_vocab_size()} tokens, expected {info.vocab_size}")
    backend.save(str(out_dir / "tokenizer.json"))
    images = info.multimodal and vision
    template = chat_template(info.version, info.kind == "spm", images)
    specials = special_tokens_map(info)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": info.kind == "spm",  # tekken's tokenizer.json adds no BOS: the chat template writes it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": template,
    }
    if images:
        config["processor_class"] = "PixtralProcessor"
        for name, data in processor_files(info).items():
            _dump(out_dir / name, data)
    _dump(out_dir / "tokenizer_config.json", config)
    _dump(out_dir / "special_tokens_map.json", specials)
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    if info.path.resolve() != (out_dir / info.path.name).resolve():
        shutil.copyfile(info.path, out_dir / info.path.name)
