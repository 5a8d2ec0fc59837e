"""quantkit convert on tiny random models of the four architectures, checked against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from native_models import MODELS, image_prompt, params_for, read_safetensors
from safetensors import safe_open

from quantkit.convert.pipeline import convert

ARCH_CLASS = {
    "pixtral_large": "LlavaForConditionalGeneration",
    "pixtral_12b": "LlavaForConditionalGeneration",
    "mistral_large": "MistralForCausalLM",
    "mistral_bpw": "MistralForCausalLM",
    "mistral_odd": "MistralForCausalLM",
    "mistral_gptq_bpw": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def read_all(folder) -> dict[str, torch.Tensor]:
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            assert st.metadata() == {"format": "pt"}
    return read_safetensors(folder)


def load_hf(folder, name):
    import transformers

    return getattr(transformers, ARCH_CLASS[name]).from_pretrained(folder, dtype=torch.float32).eval()


def logits_inputs(name: str, cfg: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    text = torch.randint(100, 30000, (9,), generator=g).tolist()
    if "vision_encoder" not in params_for(name):
        return {"input_ids": torch.tensor([[1] + text])}
    v = params_for(name)["vision_encoder"]
    ids = {"img": v["image_token_id"], "brk": v["image_break_token_id"], "end": v["image_end_token_id"]}
    size = (48, 32)  # height, width: a 3 x 2 patch grid
    pixels = torch.randn(1, 3, *size, generator=g)
    return {
        "input_ids": torch.tensor([image_prompt([size], ids, text)]),
        "pixel_values": pixels,
        "image_sizes": torch.tensor([size]),
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_matches_transformers(tiny_models, name):
    m = tiny_models.get(name)
    out = read_all(m["hf"])
    assert set(out) == set(m["hf_tensors"])
    for k, t in out.items():
        assert torch.equal(t, m["hf_tensors"][k]), k

    cfg = json.loads((m["hf"] / "config.json").read_text())
    assert cfg["architectures"] == [ARCH_CLASS[name]]
    index = json.loads((m["hf"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())

    model = load_hf(m["hf"], name)
    inputs = logits_inputs(name, cfg)
    with torch.no_grad():
        got = model(**inputs).logits
        want = m["reference"](**inputs).logits
    assert torch.equal(got, want)


def test_pixtral_config_values(tiny_models):
    large = json.loads((tiny_models.get("pixtral_large")["hf"] / "config.json").read_text())
    assert large["multimodal_projector_bias"] is False
    assert large["vision_config"]["hidden_act"] == "silu"
    assert large["vision_config"]["head_dim"] == 88
    assert large["text_config"]["rope_theta"] == 1e9
    assert large["image_token_index"] == 10
    small = json.loads((tiny_models.get("pixtral_12b")["hf"] / "config.json").read_text())
    assert small["multimodal_projector_bias"] is True
    assert small["text_config"]["head_dim"] == 32 != small["text_config"]["hidden_size"] // 4
    mixtral = json.loads((tiny_models.get("mixtral")["hf"] / "config.json").read_text())
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"]) == (4, 2)
    gen = json.loads((tiny_models.get("mixtral")["hf"] / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


def _rope_native(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """mistral-inference style: rotate interleaved pairs (2i, 2i+1) as complex numbers. x: [T, H, hd]."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cis = torch.polar(torch.ones(len(pos), hd // 2, dtype=torch.float64), pos[:, None] * freqs[None])
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2))
    return torch.view_as_real(xc * cis[:, None]).flatten(-2)


def _rope_hf(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """transformers style: rotate_half pairs (i, i + hd/2). x: [T, H, hd]."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * freqs[None]] * 2, dim=-1)[:, None]
    x = x.double()
    rot = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def test_rotary_permutation_gives_same_attention_scores():
    from quantkit.convert.transforms import permute_rope

    torch.manual_seed(0)
    dim, heads, kv_heads, hd, T = 48, 6, 2, 16, 11
    wq, wk = torch.randn(heads * hd, dim), torch.randn(kv_heads * hd, dim)
    x, pos = torch.randn(T, dim), torch.arange(T, dtype=torch.float64) * 3
    q_nat = _rope_native((x @ wq.T).view(T, heads, hd), pos, 1e6)
    k_nat = _rope_native((x @ wk.T).view(T, kv_heads, hd), pos, 1e6)
    q_hf = _rope_hf((x @ permute_rope(wq, heads).T).view(T, heads, hd), pos, 1e6)
    k_hf = _rope_hf((x @ permute_rope(wk, kv_heads).T).view(T, kv_heads, hd), pos, 1e6)
    rep = heads // kv_heads
    s_nat = torch.einsum("thd,shd->hts", q_nat, k_nat.repeat_interleave(rep, 1))
    s_hf = torch.einsum("thd,shd->hts", q_hf, k_hf.repeat_interleave(rep, 1))
    assert torch.allclose(s_nat, s_hf, atol=1e-9, rtol=1e-9)
    wrong = _rope_hf((x @ wq.T).view(T, heads, hd), pos, 1e6)  # without the permutation it must differ
    assert not torch.allclose(torch.einsum("thd,shd->hts", wrong, k_hf.repeat_interleave(rep, 1)), s_nat, atol=1e-3)


def test_sharded_source_and_output(tiny_models, tmp_path):
    from native_models import build_reference, write_native

    ref = build_reference("mistral_large", seed=3)
    _, hf = write_native("mistral_large", ref, tmp_path / "src", shards=3)
    plan = convert(tmp_path / "src", tmp_path / "dst", max_shard_size="5MB", progress=False)
    files = sorted((tmp_path / "dst").glob("model-*.safetensors"))
    assert len(files) == len(plan.shards) > 2
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())["weight_map"]
    for f in files:
        sizes = [hf[k].numel() * hf[k].element_size() for k, shard in index.items() if shard == f.name]
        assert sum(sizes) <= 5_000_000 or len(sizes) == 1
    out = read_all(tmp_path / "dst")
    assert all(torch.equal(out[k], hf[k]) for k in hf)


def test_dtype_cast_and_dry_run(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["native"]
    plan = convert(src, tmp_path / "dry", dry_run=True, progress=False)
    assert not (tmp_path / "dry").exists()
    assert "MistralForCausalLM" in plan.summary() and "1 shard" in plan.summary()
    convert(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    out = read_all(tmp_path / "bf16")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_projector_bias_modes(tiny_models, tmp_path):
    large = tiny_models.get("pixtral_large")
    convert(large["native"], tmp_path / "zeros", projector_bias="zeros", progress=False)
    out = read_all(tmp_path / "zeros")
    assert torch.count_nonzero(out["multi_modal_projector.linear_1.bias"]) == 0
    assert out["multi_modal_projector.linear_2.bias"].shape == (64,)
    cfg = json.loads((tmp_path / "zeros" / "config.json").read_text())
    assert cfg["multimodal_projector_bias"] is True
    model = load_hf(tmp_path / "zeros", "pixtral_large")
    inputs = logits_inputs("pixtral_large", cfg)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, large["reference"](**inputs).logits)

    small = tiny_models.get("pixtral_12b")
    convert(small["native"], tmp_path / "drop", projector_bias="drop", progress=False)
    assert not any("bias" in k for k in read_all(tmp_path / "drop"))
    assert json.loads((tmp_path / "drop" / "config.json").read_text())["multimodal_projector_bias"] is False


def test_source_is_not_modified(tiny_models, tmp_path):
    import hashlib

    src = tiny_models.get("mixtral")["native"]

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(src.iterdir())}

    before = digest()
    convert(src, tmp_path / "out", progress=False)
    convert(src, tmp_path / "out", force=True, progress=False)
    assert digest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind
