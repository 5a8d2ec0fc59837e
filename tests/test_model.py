"""The runtime model against transformers on tiny converted models of the four architectures.

References: the transformers model each tiny checkpoint was made from (tests/native_models.py), run in fp32 on
the same input ids; for images, pixel_values/image_sizes are built by hand (transformers' Pixtral processor
needs torchvision).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from native_models import MODELS, image_prompt
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model import Checkpoint, build_model, generate, load_model, swap_linears, unload
from quantkit.model.load import parse_devices, split_by_memory

ALL = ["mistral_large", "mixtral", "pixtral_12b", "pixtral_large"]
VISION = ["pixtral_12b", "pixtral_large"]
IMAGE_SIZES = [(64, 48), (32, 80)]  # (height, width): 4x3 and 2x5 patches, different sizes in one prompt
TOL = 1e-4


def text_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 30000, (n,), generator=g).tolist()


def make_prompt(name: str, with_images: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None, dict]:
    """(input_ids [1, T], our images, transformers kwargs) for a text or a two-image prompt."""
    if not with_images:
        ids = torch.tensor([[1, *text_ids(40)]])
        return ids, None, {"input_ids": ids}
    v = MODELS[name]["vision"]
    tokens = {"img": v["image_token_id"], "brk": v["image_break_token_id"], "end": v["image_end_token_id"]}
    ids = torch.tensor([image_prompt(IMAGE_SIZES, tokens, text_ids(12))])
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in IMAGE_SIZES]
    pixels = torch.zeros(len(images), 3, max(h for h, _ in IMAGE_SIZES), max(w for _, w in IMAGE_SIZES))
    for i, img in enumerate(images):
        pixels[i, :, : img.shape[1], : img.shape[2]] = img
    kwargs = {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor(IMAGE_SIZES)}
    return ids, images, kwargs


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """Our model loaded once per architecture from the converted folder."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(tiny_models.get(name)["hf"], dtype="float32", progress=False)
        return cache[name]

    return get


def cases() -> list[tuple[str, bool]]:
    return [(n, False) for n in ALL] + [(n, True) for n in VISION]


@pytest.mark.parametrize("name,with_images", cases())
def test_logits_match_transformers(tiny_models, loaded, name, with_images):
    ids, images, kwargs = make_prompt(name, with_images)
    with torch.no_grad():
        expected = tiny_models.get(name)["reference"](**kwargs).logits
        got = loaded(name)(ids, images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("name", ALL)
def test_greedy_generation_matches_transformers(tiny_models, loaded, name):
    """20 greedy tokens with chunked prefill (chunks of 7) equal transformers' generate on the same ids."""
    reference = tiny_models.get(name)["reference"]
    ids, images, kwargs = make_prompt(name, name in VISION)
    reference.generation_config.eos_token_id = None  # compare all 20 tokens, stop tokens included
    with torch.no_grad():
        expected = reference.generate(**kwargs, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    got = generate(loaded(name), ids[0].tolist(), images, max_new_tokens=20, chunk_size=7)
    assert len(expected) == 20
    assert got.output_ids == expected


@pytest.mark.parametrize("name", ALL)
def test_layer_by_layer_equals_full_forward(tiny_models, loaded, name):
    """Embed (vision layers streamed too), then each decoder layer loaded alone from disk and freed, then norm
    and head: bit-identical to the full forward; each layer's output also matches transformers' hidden states."""
    m = tiny_models.get(name)
    ids, images, kwargs = make_prompt(name, name in VISION)
    with torch.no_grad():
        expected = loaded(name)(ids, images)
        states = m["reference"](**kwargs, output_hidden_states=True).hidden_states
    ckpt = Checkpoint(m["hf"])
    model = build_model(ckpt.config)
    ckpt.load(model, "embed_tokens")
    with torch.no_grad():
        features = None
        if images:  # the vision tower streamed the same way: patch embedding, each layer, projector
            vision = model.vision_tower
            ckpt.load(model, "vision_tower.patch_conv")
            ckpt.load(model, "vision_tower.ln_pre")
            v, vctx = vision.embed(images)
            for j, vlayer in enumerate(vision.transformer.layers):
                v = ckpt.load(model, f"vision_tower.transformer.layers.{j}")(v, vctx)
                unload(vlayer)
            features = ckpt.load(model, "multi_modal_projector")(v[0])
        h = model.embed(ids, features=features)
        assert (h - states[0]).abs().max().item() < TOL
        ctx = model.context(0, h)
        for i, layer in enumerate(model.layers):
            ckpt.load(model, f"layers.{i}")
            resident = [j for j, lay in enumerate(model.layers) if lay.input_layernorm.weight.device.type != "meta"]
            assert resident == [i]
            h = layer(h, ctx)
            unload(layer)
            if i + 1 < len(model.layers):  # transformers' last entry is after the final norm
                assert (h - states[i + 1]).abs().max().item() < TOL
        ckpt.load(model, "norm")
        ckpt.load(model, "lm_head")
        logits = model.head(h)
    assert torch.equal(logits, expected)


class RecordingLinear(nn.Module):
    """A stand-in for a quantized linear: same math, a different module type, counts its calls."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.w = linear.weight
        self.b = linear.bias
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.linear(x, self.w, self.b)


def test_swapped_linears_carry_the_whole_forward(tiny_models, name="pixtral_12b"):
    """After swap_linears replaces every nn.Linear, the model still matches transformers: no code path reads a
    linear's weight directly, so fake-quant and packed linears can be plugged in."""
    model = load_model(tiny_models.get(name)["hf"], dtype="float32", progress=False)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert swap_linears(model, lambda name, lin: RecordingLinear(lin)) == n_linear
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids, images, kwargs = make_prompt(name, True)
    with torch.no_grad():
        expected = tiny_models.get(name)["reference"](**kwargs).logits
        got = model(ids, images)
    assert (got - expected).abs().max().item() < TOL
    assert all(m.calls > 0 for m in model.modules() if isinstance(m, RecordingLinear))


def test_sliding_window_matches_transformers(tiny_models, tmp_path):
    """A sliding window of 8 (Mistral-7B-v0.1 style): logits and greedy tokens with prefill chunks of 5."""
    from transformers import MistralForCausalLM

    folder = tmp_path / "sliding"
    shutil.copytree(tiny_models.get("mistral_large")["hf"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "sliding_window": 8}))
    reference = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    model = load_model(folder, dtype="float32", progress=False)
    ids = torch.tensor([[1, *text_ids(30, seed=3)]])
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() < TOL
        expected = reference.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    assert generate(model, ids[0].tolist(), max_new_tokens=20, chunk_size=5).output_ids == expected


def test_half_precision_matches_transformers(tiny_models):
    """bf16 end to end (casts in RMSNorm, RoPE tables in the model dtype) against transformers in bf16."""
    from transformers import MistralForCausalLM

    folder = tiny_models.get("mistral_large")["hf"]
    reference = MistralForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = load_model(folder, dtype="bfloat16", progress=False)
    ids = torch.tensor([[1, *text_ids(30, seed=4)]])
    with torch.no_grad():
        got, expected = model(ids), reference(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max().item() <= 0.02  # about one bf16 step at these magnitudes


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(loaded):
    model = loaded("mistral_large")
    ids = [1, *text_ids(10)]
    greedy = generate(model, ids, max_new_tokens=8).output_ids
    first = generate(model, ids, max_new_tokens=8, temperature=1.0, seed=7).output_ids
    assert generate(model, ids, max_new_tokens=8, temperature=1.0, seed=7).output_ids == first
    assert first != greedy  # random tiny model: sampling at T=1 does not follow the argmax path
    assert generate(model, ids, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3).output_ids == greedy


def test_generation_stops_at_stop_token_and_context(tiny_models, loaded, tmp_path):
    model = loaded("mistral_large")
    ids = [1, *text_ids(16)]
    greedy = generate(model, ids, max_new_tokens=10).output_ids
    stopped = generate(model, ids, max_new_tokens=10, stop_ids=[greedy[3]]).output_ids
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    folder = tmp_path / "short"
    shutil.copytree(tiny_models.get("mistral_large")["hf"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 20}))
    short = load_model(folder, progress=False)
    assert generate(short, ids, max_new_tokens=10).output_ids == greedy[:4]  # positions 17, 18, 19 fit, then stop
    with pytest.raises(QuantkitError, match="the prompt is 21 tokens, longer than the model's context of 20"):
        generate(short, [1, *text_ids(20)], max_new_tokens=1)


def test_sharded_checkpoint_loads(tiny_models, tmp_path):
    """Tensors spread over three shards plus model.safetensors.index.json, as convert writes large models."""
    from safetensors.torch import load_file, save_file

    m = tiny_models.get("mixtral")
    tensors = {}
    for f in m["hf"].glob("*.safetensors"):
        tensors.update(load_file(f))
    names, weight_map = sorted(tensors), {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in names[i::3]}, tmp_path / shard)
        weight_map.update(dict.fromkeys(names[i::3], shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(m["hf"] / "config.json", tmp_path)
    ids, _, kwargs = make_prompt("mixtral", False)
    with torch.no_grad():
        got = load_model(tmp_path, dtype="float32", progress=False)(ids)
        expected = m["reference"](**kwargs).logits
    assert (got - expected).abs().max().item() < TOL


def test_load_errors_are_one_line(tiny_models, tmp_path):
    hf = tiny_models.get("mistral_large")["hf"]
    with pytest.raises(QuantkitError, match="has no config.json"):
        load_model(tmp_path, progress=False)
    with pytest.raises(QuantkitError, match="run `quantkit convert` first"):
        load_model(tiny_models.get("mistral_large")["native"], progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(QuantkitError, match="tensors the model does not use: model.layers.1"):
        load_model(bad, progress=False)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(QuantkitError, match="config.json implies"):
        load_model(bad, progress=False)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    with pytest.raises(QuantkitError, match="architecture Qwen2ForCausalLM is not supported"):
        load_model(bad, progress=False)


def test_split_by_memory_is_proportional_to_free_memory():
    # 10 equal parts, 3:1 free memory: the first GPU's share ends at 7.5 parts, so parts 0-7 (midpoints <= 7.5)
    assert split_by_memory([1] * 10, [30, 10]) == [0] * 8 + [1] * 2
    assert split_by_memory([4, 4, 4, 4], [10, 10, 10, 10]) == [0, 1, 2, 3]
    assert split_by_memory([5, 1, 1, 1], [100]) == [0, 0, 0, 0]
    with pytest.raises(QuantkitError, match="needs"):
        split_by_memory([10, 10], [5, 5])


def test_device_choices():
    assert parse_devices("cpu") == [torch.device("cpu")]
    if not torch.cuda.is_available():
        assert parse_devices("auto") == [torch.device("cpu")]
        with pytest.raises(QuantkitError, match="CUDA is not available"):
            parse_devices("cuda:0")
    with pytest.raises(QuantkitError, match="unknown device"):
        parse_devices("gpu0")
