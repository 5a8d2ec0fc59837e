"""Output formats are objects in a registry: a format defined and registered here, in the test file alone, is
quantized into, written, loaded and run by the unchanged package (issue 26, must-show 1)."""

from __future__ import annotations

import json

import pytest
import torch
from native_models import read_safetensors
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.base import Built, OutputFormat
from quantkit.formats.registry import FORMATS, get_format, register
from quantkit.formats.spec import LinearSpec, QuantSettings
from quantkit.quant.pipeline import quantize
from quantkit.quant.settings import QuantizeOptions
from quantkit.quantized_model import load_any


class RowLinear(nn.Module):
    """y = x (codes * row_scale)ᵀ: int8 codes, one fp16 scale per output row."""

    def __init__(self, codes: torch.Tensor, row_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("row_scale", row_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.codes.to(x.dtype) * self.row_scale.to(x.dtype)[:, None]
        return x @ w.T


class RowRTN(OutputFormat):
    """Plain round-to-nearest of the solved weight: 8-bit symmetric codes with a per-row scale."""

    name = "toy-row-rtn"
    help = "test only: int8 codes, one scale per row"
    widths = (8,)
    key_tensor = "codes"
    markers = frozenset({"codes", "row_scale"})

    def stored_bits(self, spec: LinearSpec, out_features: int, in_features: int, s: QuantSettings) -> int:
        return out_features * in_features * 8 + out_features * 16

    def tensors(self, solved) -> dict[str, torch.Tensor]:
        w = solved.weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).half()
        codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"codes": codes, "row_scale": scale}

    def weight_count(self, prefix: str, index, qcfg: dict) -> int:
        return index.infos[f"{prefix}.codes"].numel

    def quantization_config(self, b: Built) -> dict:
        return {"quant_method": self.name, "bits": 8, "calibration": b.calibration}

    def linear(self, qcfg: dict, prefix: str, tensors: dict[str, torch.Tensor], backend: str, shape) -> nn.Module:
        return RowLinear(tensors["codes"], tensors["row_scale"])


@pytest.fixture
def toy_format():
    fmt = register(RowRTN())
    yield fmt
    FORMATS.pop(fmt.name)


def test_a_format_registered_from_a_test_file_quantizes_saves_loads_and_runs(toy_format, tiny_models, tmp_path):
    src, dst = tiny_models.get("mistral_large")["hf"], tmp_path / "toy"
    opts = QuantizeOptions(QuantSettings(8, None), fmt=toy_format.name, rows=2, seq_len=32)
    quantize(src, dst, opts, progress=False, log=lambda _: None)

    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "toy-row-rtn" and qcfg["calibration"]["rows"] == 2
    tensors = read_safetensors(dst)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q_proj}.codes"].dtype == torch.int8 and f"{q_proj}.weight" not in tensors
    assert tensors[f"{q_proj}.row_scale"].shape == (tensors[f"{q_proj}.codes"].shape[0],)

    model = load_any(dst, "cpu", "float32", "torch", progress=False)
    swapped = [m for m in model.modules() if isinstance(m, RowLinear)]
    assert len(swapped) == 7 * len(model.layers)  # q, k, v, o, gate, up, down of every layer
    reference = load_any(src, "cpu", "float32", "torch", progress=False)
    ids = torch.randint(0, reference.embed_tokens.num_embeddings, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).float(), reference(ids).float()
    assert torch.isfinite(got).all()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.05, rel  # GPTQ at 8 bits, then 8-bit rows: close to the float model, not equal to it


def test_the_registry_refuses_unknown_names_and_a_taken_name():
    with pytest.raises(QuantkitError, match="unknown format 'nope'"):
        get_format("nope")
    with pytest.raises(QuantkitError, match="already registered"):
        register(type("Again", (RowRTN,), {"name": "gptq"})())
    with pytest.raises(QuantkitError, match="takes --bits only"):
        RowRTN().candidates("attn", False)
    assert get_format("gptq") is FORMATS["gptq"] and get_format(FORMATS["gptq"]) is FORMATS["gptq"]


def test_a_width_the_format_does_not_store_is_refused_before_any_work(toy_format, tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    opts = QuantizeOptions(QuantSettings(4, None), fmt=toy_format.name, rows=2, seq_len=32)
    with pytest.raises(QuantkitError, match="--format toy-row-rtn stores 8 bits, not 4"):
        quantize(src, tmp_path / "out", opts, progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()
