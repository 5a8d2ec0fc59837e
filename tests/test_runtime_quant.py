"""Quantized folders (quantkit and GPTQ formats) in the runtime: exact against dequantized float models, Triton vs
torch generation with an image, `quantkit run` on both formats, refusals, GPTQ repacking and the roofline figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from native_models import read_safetensors
from torch import nn

from quantkit.arch import export_name
from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.formats.gptq import gptq_pack
from quantkit.formats.packed import dequantize, from_tensors
from quantkit.formats.registry import get_format
from quantkit.kernels.qlinear import QuantLinear, gptq_to_packed, int4_kernel_available
from quantkit.model import roofline
from quantkit.model.generate import KV_FRACTION, Generation, Sampling, cache_capacity, stop_note
from quantkit.model.load import load_model
from quantkit.quantized_model import load_any, load_quantized, set_backend
from quantkit.tokenizer.chat import ChatTokenizer

FAST = ["--group-size", "32", "--rows", "4", "--seq-len", "64", "--quiet"]
BUILDS = {  # name: quantize arguments (tiny Pixtral-12B: text dims 64/128, vocab 131072)
    "quantkit4": ["--format", "quantkit", "--bits", "4"],
    "quantkit3": ["--format", "quantkit", "--bits", "3", "--asym"],
    "gptq4": ["--format", "gptq", "--bits", "4", "--head-bits", "4"],
}
PROMPT = "What is in this image?"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    src = tiny_models.get("pixtral_12b")["hf"]
    root = tmp_path_factory.mktemp("quantized")
    out = {"float": src}
    for name, args in BUILDS.items():
        result = cli("quantize", src, root / name, *args, *FAST)
        assert result.exit_code == 0, result.output + str(result.exception)
        out[name] = root / name
    return out


def gptq4_weight(t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The GPTQ v1 4-bit rule with plain bit arithmetic: W[o, i] = s[g_idx[i], o] · (q[o, i] − (stored zero + 1))."""
    qweight, qzeros = t[f"{prefix}.qweight"].long() & 0xFFFFFFFF, t[f"{prefix}.qzeros"].long() & 0xFFFFFFFF
    scales, g = t[f"{prefix}.scales"].float(), t[f"{prefix}.g_idx"].long()
    shifts = torch.arange(8) * 4
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])  # [in, out]
    z = (((qzeros[:, :, None] >> shifts) & 15).reshape(qzeros.shape[0], -1) + 1) & 15  # [groups, out]
    return (scales[g] * (q - z[g])).T  # [out, in]


def dequantized_float_model(src: Path, folder: Path) -> nn.Module:
    """The float model with every quantized linear's weight replaced by its dequantized checkpoint weight."""
    model = load_model(src, device="cpu", dtype="float32", progress=False)
    t = read_safetensors(folder)
    replaced = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        key = model.config.checkpoint_key(f"{name}.weight")
        prefix = export_name(model.config.arch, key, "vllm").removesuffix(".weight")  # the default naming
        if f"{prefix}.qmeta" in t:
            mod.weight.data = dequantize(from_tensors(prefix, t))
        elif f"{prefix}.qweight" in t:
            mod.weight.data = gptq4_weight(t, prefix)
        else:
            continue
        replaced += 1
    assert replaced > 0
    return model


def image_prompt(folder: Path, image: Path):
    tok = ChatTokenizer.from_folder(folder)
    content = [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": str(image)}]
    enc = tok.encode_chat([{"role": "user", "content": content}])
    return torch.tensor([enc.input_ids]), enc.images


@pytest.mark.parametrize("name", list(BUILDS))
def test_quantized_logits_equal_dequantized_float_model(builds, scene_image, name):
    model = load_quantized(builds[name], device="cpu", dtype="float32", backend="torch", progress=False, fuse=False)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 + (name == "gptq4")  # every decoder linear, and the head when --head-bits
    assert not any(isinstance(m, QuantLinear) for m in model.vision_tower.modules())
    assert model.layers[0].mlp.up_proj.scales.dtype == torch.float16  # buffers are not cast to the compute dtype
    ids, images = image_prompt(builds[name], scene_image)
    with torch.no_grad():
        got = model(ids, images)
        expected = dequantized_float_model(builds["float"], builds[name])(ids, images)
        unquantized = load_model(builds["float"], dtype="float32", progress=False)(ids, images)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 1e-5 * scale
    assert (got - unquantized).abs().max().item() > 1e-3 * scale  # the quantized weights really are in use


@pytest.mark.skipif(not int4_kernel_available(), reason="aten's int4 CPU kernel is not vectorized here")
def test_bf16_gptq_folder_decodes_on_the_int4_kernel(builds):
    """A bf16 model on CPU runs its 4-bit GPTQ linears (here with group size 32 and a 4-bit head) on aten's int4
    kernel; its logits stay within bf16 error of the dequantized float model's."""
    model = load_quantized(builds["gptq4"], device="cpu", dtype="bfloat16", backend="torch", progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and all(m.int4_bytes > 0 for m in linears)  # qkv, o, gate_up, down; head
    ids = torch.tensor([[1, 17, 300, 4096, 77]])  # 5 rows: the int4 kernel, not the kept bf16 weights
    with torch.no_grad():
        got = model(ids).float()
        expected = dequantized_float_model(builds["float"], builds["gptq4"])(ids)
    assert (got - expected).abs().max().item() < 3e-2 * expected.abs().max().item()


@pytest.mark.parametrize("name", ["quantkit4", "quantkit3"])
def test_triton_and_torch_backends_generate_the_same_tokens(builds, scene_image, name):
    """Issue 7, must-show 2: greedy generation with an image, the Triton kernels (interpreter on CPU) vs torch."""
    outputs = {}
    for backend in ("torch", "triton"):
        args = ["run", builds[name], "--prompt", PROMPT, "--image", scene_image, "--max-new-tokens", 5]
        result = cli(*args, "--backend", backend, "--device", "cpu", "--json", "--quiet")
        assert result.exit_code == 0, result.output + str(result.exception)
        outputs[backend] = json.loads(result.stdout)["output_ids"]
    assert len(outputs["torch"]) == 5
    assert outputs["triton"] == outputs["torch"]


def test_run_works_on_a_gptq_folder(builds):
    """(quantkit-format folders run through `quantkit run` in the backend test above.)"""
    result = cli("run", builds["gptq4"], "--prompt", "Hello", "--max-new-tokens", 2, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output + str(result.exception)
    assert "decode" in result.stderr and "tok/s" in result.stderr


def test_float_folder_loads_without_quantized_linears(builds):
    model = load_any(builds["float"], dtype="float32", progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_quantized_config_without_quantized_tensors_is_refused(builds, tmp_path):
    folder = tmp_path / "fake"
    shutil.copytree(builds["float"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="no quantized layer was found"):
        load_any(folder, progress=False)
    result = cli("run", folder, "--prompt", "hi", "--device", "cpu", "--quiet")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no quantized layer was found" in lines[0], result.stderr
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="'awq' is not supported"):
        load_any(folder, progress=False)


def test_switching_backend_keeps_the_logits(builds):
    model = load_quantized(builds["quantkit3"], dtype="float32", backend="torch", progress=False)
    ids = torch.tensor([[1, 1500, 2900, 4000, 777]])
    with torch.no_grad():
        torch_logits = model(ids)
        assert set_backend(model, "triton") == 2 * 4  # per layer qkv, o, gate_up, down: q/k/v, gate/up fused
        triton_logits = model(ids)
    assert (triton_logits - torch_logits).abs().max().item() < 1e-4 * torch_logits.abs().max().item()


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_linear_repacks_in_slices_to_the_gptq_weight(bits):
    """Asymmetric, act-order GPTQ tensors (repacked in slices of 32 outputs; and as the loader does it: the format's
    module filled from a state dict, then its repack step) equal W = s[g_idx] · (q − z[g_idx]) from the codes."""
    gen = torch.Generator().manual_seed(bits)
    n, k, gs = 96, 128, 32
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(k // gs, n, generator=gen) + 0.5).half()
    zeros = torch.randint(1, 2**bits, (k // gs, n), generator=gen)
    g_idx = (torch.randperm(k, generator=gen) // gs).int()  # act order: groups scattered over the columns
    tensors = gptq_pack(q, scales, zeros, g_idx, bits)
    g = g_idx.long()
    expected = scales.float()[g].T * (q - zeros[g].T)  # [n, k]
    assert torch.equal(dequantize(gptq_to_packed(tensors, bits, sym=False, chunk=32)), expected)
    meta = {key: torch.empty_like(t, device="meta") for key, t in tensors.items()}
    fmt, qcfg = get_format("gptq"), {"quant_method": "gptq", "bits": bits, "sym": False}
    stored = fmt.linear(qcfg, "x", meta, "torch", (n, k))
    stored.load_state_dict(tensors, assign=True)
    with pytest.raises(QuantkitError, match="repacked"):
        stored(torch.randn(1, k))
    linear = fmt.repack(stored, "torch")
    assert isinstance(linear, QuantLinear) and "qweight" not in dict(linear.named_buffers())
    assert torch.equal(dequantize(linear.packed), expected)
    x = torch.randn(3, k, generator=gen)
    assert torch.allclose(linear(x), x @ expected.T, atol=1e-4)


def test_decode_bytes_count_every_stored_decoder_tensor(builds):
    folder = builds["quantkit4"]
    model = load_quantized(folder, dtype="float32", progress=False, fuse=False)  # fused: one perm for q/k/v
    t = read_safetensors(folder)
    decode = ("language_model.model.layers.", "language_model.model.norm.", "language_model.lm_head.")
    cast = ("norm.weight", "lm_head.weight")  # float parameters, loaded as float32; quantized tensors as stored
    expected = sum(
        v.numel() * (4 if k.endswith(cast) else v.element_size()) for k, v in t.items() if k.startswith(decode)
    )
    assert roofline.decode_bytes(model) == {torch.device("cpu"): expected}
    assert roofline.roofline_seconds(model) is None  # no GPU bandwidth on a CPU


def test_gpu_bandwidth_table_and_override(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv(roofline.BANDWIDTH_ENV, raising=False)
    assert roofline.device_bandwidth(torch.device("cuda", 0)) == 3.35e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GH200 480GB")
    assert roofline.device_bandwidth(torch.device("cuda", 0)) == 4.0e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert roofline.device_bandwidth(torch.device("cuda", 0)) is None
    monkeypatch.setenv(roofline.BANDWIDTH_ENV, "2.5e12")
    assert roofline.device_bandwidth(torch.device("cuda", 0)) == 2.5e12
    assert roofline.device_bandwidth(torch.device("cpu")) is None
    monkeypatch.setenv(roofline.BANDWIDTH_ENV, "fast")
    with pytest.raises(QuantkitError, match=roofline.BANDWIDTH_ENV):
        roofline.device_bandwidth(torch.device("cuda", 0))


def test_triton_backend_on_cpu_without_interpreter_is_refused_before_loading(builds, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(QuantkitError, match="needs TRITON_INTERPRET=1"):
        load_quantized(builds["quantkit4"], device="cpu", backend="triton", progress=False)


def test_kv_cache_capacity_follows_free_gpu_memory(monkeypatch):
    """Two layers on one GPU, bf16, 2 KV heads of 16: 2 · 2 · 16 · 2 bytes per position per layer."""
    cuda = torch.device("cuda", 0)
    weight = SimpleNamespace(device=cuda, element_size=lambda: 2)
    layer = SimpleNamespace(input_layernorm=SimpleNamespace(weight=weight))
    text = SimpleNamespace(n_kv_heads=2, head_dim=16)
    model = SimpleNamespace(layers=[layer, layer], config=SimpleNamespace(text=text))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (10_000_000, 80_000_000_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3_000_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1_000_000)
    per_position = 2 * (2 * 2 * 16 * 2)
    assert cache_capacity(model) == int(12_000_000 * KV_FRACTION) // per_position
    weight.device = torch.device("cpu")
    assert cache_capacity(model) is None


def test_stop_note_names_the_context_or_the_memory_limit():
    model = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(max_seq_len=100)))
    sampling = Sampling(max_new_tokens=10)
    assert stop_note(model, Generation([1] * 90, [5] * 10, 1.0, 1.0, 100), sampling, stop_ids={2}) == ""
    assert stop_note(model, Generation([1] * 30, [5, 2], 1.0, 1.0, 40), sampling, stop_ids={2}) == ""
    assert "context of 100" in stop_note(model, Generation([1] * 95, [5] * 5, 1.0, 1.0, 100), sampling, stop_ids={2})
    note = stop_note(model, Generation([1] * 30, [5] * 4, 1.0, 1.0, 34), sampling, stop_ids={2})
    assert "stopped at 34 tokens" in note and "free GPU memory" in note


def test_serving_a_quantized_folder_reads_its_config_json_once(builds, monkeypatch):
    """serve's path from the folder to a described, loaded model (load_model_config, load_any, describe) parses
    config.json once: the quantization_config travels in the parsed ModelConfig."""
    from quantkit.model.config import load_model_config
    from quantkit.serve.server import describe

    folder = builds["gptq4"]
    reads, original = [], Path.read_text

    def read_text(self, *a, **k):
        if self.name == "config.json":
            reads.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    config = load_model_config(folder)
    model = load_any(folder, "cpu", "float32", "torch", progress=False, config=config)
    lines = describe(model, folder, "tiny")
    assert reads == [folder / "config.json"]
    assert "gptq quantized, per-module 4-bit" in lines[0] and model.config.quantization["bits"] == 4
