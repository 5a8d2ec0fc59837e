"""Tiny random models of the four target architectures, written in Mistral-native layout.

The reference is a transformers model with random weights. Its own save_pretrained output (HF on-disk layout)
is mapped back to Mistral-native names with the table below, written independently of quantkit's tables,
and q/k are un-permuted back to interleaved rotary. Tests convert the native folder with quantkit and compare
against the transformers reference.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mistral_common
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZERS = Path(mistral_common.__file__).parent / "data"

MODELS = {
    # Pixtral-Large-like: no projector bias, vision head_dim 88 (not a power of two), spm v7m1 tokenizer.
    "pixtral_large": dict(
        text=dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=32768,
                  rope_theta=1e9),
        vision=dict(hidden_size=176, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_token_id=10, image_break_token_id=14, image_end_token_id=15, adapter_bias=False),
        tokenizer="mistral_instruct_tokenizer_241114.model.v7m1",
        native_tokenizer_name="tokenizer.model.v7m1",
    ),
    # Pixtral-12B-like: projector bias, text head_dim (32) != dim / n_heads (16), tekken tokenizer.
    "pixtral_12b": dict(
        text=dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=131072,
                  rope_theta=1e9),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_token_id=10, image_break_token_id=12, image_end_token_id=13),
        tokenizer="tekken_240911.json",
        native_tokenizer_name="tekken.json",
    ),
    "mistral_large": dict(
        text=dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=32768,
                  rope_theta=1e6),
        tokenizer="mistral_instruct_tokenizer_240323.model.v3",
        native_tokenizer_name="tokenizer.model.v3",
    ),
    # Wide enough that one group of columns is a small step of the bit budget (for --bpw).
    "mistral_bpw": dict(
        text=dict(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=32768,
                  rope_theta=1e6),
        tokenizer="mistral_instruct_tokenizer_240323.model.v3",
        native_tokenizer_name="tokenizer.model.v3",
    ),
    # Eight layers: the GPTQ format's smallest step (one o_proj one width up) is ~0.014 bpw of the budget.
    "mistral_gptq_bpw": dict(
        text=dict(dim=128, hidden_dim=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=32768,
                  rope_theta=1e6),
        tokenizer="mistral_instruct_tokenizer_240323.model.v3",
        native_tokenizer_name="tokenizer.model.v3",
    ),
    # One layer whose in-features are multiples of 128 (the largest group) but not powers of two, and whose
    # out-features are not multiples of 128 (k/v 32 rows, gate/up 384): for bpw accounting under every setting.
    "mistral_odd": dict(
        text=dict(dim=128, hidden_dim=384, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=32, vocab_size=32768,
                  rope_theta=1e6),
        tokenizer="mistral_instruct_tokenizer_240323.model.v3",
        native_tokenizer_name="tokenizer.model.v3",
    ),
    "mixtral": dict(
        text=dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=32000,
                  rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2)),
        tokenizer="tokenizer.model.v1",
        native_tokenizer_name="tokenizer.model",
    ),
}  # fmt: skip

# HF on-disk name -> native name (anchored; the optional Llava prefix covers both text layouts).
_LM = r"^(?:language_model\.)?"
HF_TO_NATIVE = [
    (_LM + r"lm_head\.weight$", "output.weight"),
    (_LM + r"model\.embed_tokens\.weight$", "tok_embeddings.weight"),
    (_LM + r"model\.norm\.weight$", "norm.weight"),
    (_LM + r"model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.attention_norm.weight"),
    (_LM + r"model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (_LM + r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$", r"layers.\1.attention.w\2.weight"),
    (_LM + r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight$", r"layers.\1.feed_forward.w1.weight"),
    (_LM + r"model\.layers\.(\d+)\.mlp\.down_proj\.weight$", r"layers.\1.feed_forward.w2.weight"),
    (_LM + r"model\.layers\.(\d+)\.mlp\.up_proj\.weight$", r"layers.\1.feed_forward.w3.weight"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$", r"layers.\1.feed_forward.gate.weight"),
    (
        r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$",
        r"layers.\1.feed_forward.experts.\2.\3.weight",
    ),
    (r"^vision_tower\.(patch_conv|ln_pre)\.weight$", r"vision_encoder.\1.weight"),
    (
        r"^vision_tower\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight$",
        r"vision_encoder.transformer.layers.\1.\2.weight",
    ),
    (
        r"^vision_tower\.transformer\.layers\.(\d+)\.attention\.([qkvo])_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.attention.w\2.weight",
    ),
    (
        r"^vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.gate_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w1.weight",
    ),
    (
        r"^vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.down_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w2.weight",
    ),
    (
        r"^vision_tower\.transformer\.layers\.(\d+)\.feed_forward\.up_proj\.weight$",
        r"vision_encoder.transformer.layers.\1.feed_forward.w3.weight",
    ),
    (r"^multi_modal_projector\.linear_1\.(weight|bias)$", r"vision_language_adapter.w_in.\1"),
    (r"^multi_modal_projector\.linear_2\.(weight|bias)$", r"vision_language_adapter.w_out.\1"),
]


def hf_to_native_name(name: str) -> str:
    for pattern, repl in HF_TO_NATIVE:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise KeyError(name)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half row order -> native interleaved pairs (the inverse of the converter's permutation)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def params_for(name: str) -> dict:
    spec = MODELS[name]
    params = {**spec["text"], "norm_eps": 1e-5}
    if "vision" in spec:
        params["vision_encoder"] = {
            "num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0, **spec["vision"],
        }  # fmt: skip
    return params


def build_reference(name: str, seed: int = 0):
    """A transformers model with every parameter random (norms around 1), in float32 eval mode."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        PixtralVisionConfig,
    )

    p = params_for(name)
    text = dict(
        hidden_size=p["dim"], intermediate_size=p["hidden_dim"], num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"], head_dim=p["head_dim"],
        vocab_size=p["vocab_size"], rope_theta=p["rope_theta"], rms_norm_eps=1e-5, sliding_window=None,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    if "moe" in p:
        cfg = MixtralConfig(**text, num_local_experts=p["moe"]["num_experts"],
                            num_experts_per_tok=p["moe"]["num_experts_per_tok"])  # fmt: skip
        model = MixtralForCausalLM(cfg)
    elif "vision_encoder" in p:
        v = p["vision_encoder"]
        vcfg = PixtralVisionConfig(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
            head_dim=v["hidden_size"] // v["num_attention_heads"], hidden_act="silu", image_size=1024, patch_size=16,
            rope_theta=10000.0,
        )  # fmt: skip
        cfg = LlavaConfig(
            text_config=MistralConfig(**text), vision_config=vcfg, image_token_index=v["image_token_id"],
            multimodal_projector_bias=v.get("adapter_bias", True), projector_hidden_act="gelu",
            vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=1,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = LlavaForConditionalGeneration(cfg)
    else:
        model = MistralForCausalLM(MistralConfig(**text))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.08
            param.copy_(1.0 + noise if "norm" in pname else noise)
    return model.float().eval()


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in folder, read with the safetensors library (not quantkit's reader)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def hf_tensors(model, folder: Path) -> dict[str, torch.Tensor]:
    """What transformers itself writes to disk for this model (the legacy on-disk names)."""
    model.save_pretrained(folder)
    return read_safetensors(folder)


def write_native(
    name: str, reference, folder: Path, *, dtype=torch.float32, shards: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write the reference model as a Mistral-native checkpoint; returns (native tensors, HF on-disk tensors)."""
    p = params_for(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = hf_tensors(reference, folder / "_hf_ref")
    heads = {"text_q": p["n_heads"], "text_k": p["n_kv_heads"]}
    if "vision_encoder" in p:
        heads["vision"] = p["vision_encoder"]["num_attention_heads"]
    native = {}
    for k, t in hf.items():
        n = hf_to_native_name(k)
        if re.search(r"attention\.w[qk]\.weight$", n):
            h = heads["vision"] if n.startswith("vision") else heads["text_q" if n.endswith("wq.weight") else "text_k"]
            t = unpermute(t, h)
        native[n] = t.to(dtype).contiguous()
    names = sorted(native)
    if shards == 1:
        save_file(native, str(folder / "consolidated.safetensors"))
    else:
        chunks = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, chunk in enumerate(chunks):
            fname = f"consolidated-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: native[n] for n in chunk}, str(folder / fname))
            weight_map.update({n: fname for n in chunk})
        (folder / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "params.json").write_text(json.dumps(p, indent=2))
    tok = MODELS[name]["tokenizer"]
    os.symlink(TOKENIZERS / tok, folder / MODELS[name]["native_tokenizer_name"])
    for f in (folder / "_hf_ref").iterdir():
        f.unlink()
    (folder / "_hf_ref").rmdir()
    return native, hf


def image_prompt(image_sizes: list[tuple[int, int]], ids: dict[str, int], text: list[int]) -> list[int]:
    """BOS, then per image rows of [IMG]*w + [IMG_BREAK] with the last replaced by [IMG_END], then text ids."""
    out = [1]
    for h, w in image_sizes:
        rows, cols = h // 16, w // 16
        for r in range(rows):
            out += [ids["img"]] * cols + [ids["end"] if r == rows - 1 else ids["brk"]]
    return out + text
