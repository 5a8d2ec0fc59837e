"""The real models' full tensor lists, as metadata only: every tensor maps once and the configs load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from quantkit.convert.pipeline import plan_conversion
from quantkit.io.reader import TensorInfo

PIXTRAL_VISION_LARGE = {
    "hidden_size": 1408, "num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0,
    "intermediate_size": 6144, "num_hidden_layers": 40, "num_attention_heads": 16, "image_token_id": 10,
    "image_break_token_id": 14, "image_end_token_id": 15, "adapter_bias": False,
}  # fmt: skip
PIXTRAL_VISION_12B = {
    "hidden_size": 1024, "num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0,
    "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_token_id": 10,
}  # fmt: skip
LARGE_TEXT = {"dim": 12288, "n_layers": 88, "head_dim": 128, "hidden_dim": 28672, "n_heads": 96, "n_kv_heads": 8,
              "norm_eps": 1e-05, "vocab_size": 32768}  # fmt: skip

# name -> (params.json, tensor count, total parameters, published in the model cards / conversion spec)
REAL = {
    "Pixtral-Large-Instruct-2411": (
        {**LARGE_TEXT, "rope_theta": 1000000000.0, "vision_encoder": PIXTRAL_VISION_LARGE}, 1159, 124_134_845_824,
    ),
    "Pixtral-12B-2409": (
        {"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
         "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072, "vision_encoder": PIXTRAL_VISION_12B},
        585, 12_682_739_712,
    ),
    "Mistral-Large-Instruct-2407": ({**LARGE_TEXT, "rope_theta": 1000000.0}, 795, 122_610_069_504),
    "Mixtral-8x7B-Instruct-v0.1": (
        {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
         "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}},
        995, 46_702_792_704,
    ),
}  # fmt: skip


def native_tensor_list(p: dict) -> dict[str, tuple[int, ...]]:
    """The native checkpoint's names and shapes, written out from mistral-inference's module tree."""
    d, hd, ffn = p["dim"], p["head_dim"], p["hidden_dim"]
    q, kv = p["n_heads"] * hd, p["n_kv_heads"] * hd
    t = {"tok_embeddings.weight": (p["vocab_size"], d), "norm.weight": (d,), "output.weight": (p["vocab_size"], d)}
    for i in range(p["n_layers"]):
        pre = f"layers.{i}."
        t |= {pre + "attention_norm.weight": (d,), pre + "ffn_norm.weight": (d,)}
        t |= {pre + "attention.wq.weight": (q, d), pre + "attention.wk.weight": (kv, d)}
        t |= {pre + "attention.wv.weight": (kv, d), pre + "attention.wo.weight": (d, q)}
        if "moe" in p:
            t[pre + "feed_forward.gate.weight"] = (p["moe"]["num_experts"], d)
            for e in range(p["moe"]["num_experts"]):
                ex = f"{pre}feed_forward.experts.{e}."
                t |= {ex + "w1.weight": (ffn, d), ex + "w2.weight": (d, ffn), ex + "w3.weight": (ffn, d)}
        else:
            t |= {pre + "feed_forward.w1.weight": (ffn, d), pre + "feed_forward.w2.weight": (d, ffn)}
            t[pre + "feed_forward.w3.weight"] = (ffn, d)
    if v := p.get("vision_encoder"):
        vd, vf = v["hidden_size"], v["intermediate_size"]
        t |= {"vision_encoder.patch_conv.weight": (vd, 3, 16, 16), "vision_encoder.ln_pre.weight": (vd,)}
        for j in range(v["num_hidden_layers"]):
            pre = f"vision_encoder.transformer.layers.{j}."
            t |= {pre + "attention_norm.weight": (vd,), pre + "ffn_norm.weight": (vd,)}
            t |= {pre + f"attention.w{x}.weight": (vd, vd) for x in "qkvo"}
            t |= {pre + "feed_forward.w1.weight": (vf, vd), pre + "feed_forward.w2.weight": (vd, vf)}
            t[pre + "feed_forward.w3.weight"] = (vf, vd)
        t |= {"vision_language_adapter.w_in.weight": (d, vd), "vision_language_adapter.w_out.weight": (d, d)}
        if v.get("adapter_bias", True):
            t |= {"vision_language_adapter.w_in.bias": (d,), "vision_language_adapter.w_out.bias": (d,)}
    return t


def as_infos(shapes: dict[str, tuple[int, ...]], per_file: int = 40) -> dict[str, TensorInfo]:
    infos, offset = {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape) * 2
        infos[name] = TensorInfo(
            name, "BF16", shape, Path(f"consolidated-{i // per_file:05d}.safetensors"), offset, offset + n
        )
        offset += n
    return infos


@pytest.mark.parametrize("model", list(REAL))
def test_real_model_plan(model):
    from transformers import AutoConfig

    params, n_tensors, n_params = REAL[model]
    shapes = native_tensor_list(params)
    assert len(shapes) == n_tensors
    plan = plan_conversion(params, as_infos(shapes))
    assert len(plan.specs) == len(plan.maps) == n_tensors
    assert len({s.name for s in plan.specs}) == n_tensors  # every tensor maps once, to a distinct name
    assert sum(plan.part_params.values()) == n_params
    assert plan.total_bytes == 2 * n_params
    assert all(sum(s.nbytes for s in shard) <= 5e9 for shard in plan.shards)

    cfg = AutoConfig.for_model(**plan.config)
    text = cfg.get_text_config()
    assert text.hidden_size == params["dim"] and text.num_hidden_layers == params["n_layers"]
    assert text.num_attention_heads == params["n_heads"] and text.num_key_value_heads == 8
    assert text.head_dim == 128 and text.intermediate_size == params["hidden_dim"]
    assert text.vocab_size == params["vocab_size"]
    theta = text.rope_parameters["rope_theta"] if getattr(text, "rope_parameters", None) else text.rope_theta
    assert theta == params.get("rope_theta", 1e6)
    if "vision_encoder" in params:
        v = params["vision_encoder"]
        assert type(cfg).__name__ == "LlavaConfig"
        assert cfg.vision_config.hidden_size == v["hidden_size"]
        assert cfg.vision_config.num_hidden_layers == v["num_hidden_layers"]
        assert cfg.vision_config.head_dim == v["hidden_size"] // 16
        assert cfg.vision_config.hidden_act == "silu"
        assert cfg.multimodal_projector_bias == v.get("adapter_bias", True)
        assert cfg.image_token_id == 10
    if "moe" in params:
        assert (text.num_local_experts, text.num_experts_per_tok) == (8, 2)


def test_pixtral_large_numbers():
    params, _, _ = REAL["Pixtral-Large-Instruct-2411"]
    plan = plan_conversion(params, as_infos(native_tensor_list(params)))
    assert plan.config["vision_config"]["head_dim"] == 88
    assert plan.config["text_config"]["rope_theta"] == 1e9
    assert plan.config["multimodal_projector_bias"] is False
    assert not any("bias" in s.name for s in plan.specs)
    assert plan.part_params == {"text": 122_610_069_504, "vision": 1_356_479_872, "projector": 168_296_448}
    sizes = [sum(s.nbytes for s in shard) for shard in plan.shards]
    assert max(sizes) <= 5e9 and len(sizes) >= math.ceil(plan.total_bytes / 5e9) == 50
    # greedy: no shard could have taken the next shard's first tensor
    assert all(sizes[i] + plan.shards[i + 1][0].nbytes > 5e9 for i in range(len(sizes) - 1))
