"""A made-up architecture variant declared in quantkit.arch only: a Mistral whose native checkpoint names its MLP
`mlp.fc_gate / fc_up / fc_down` (and says so in params.json) converts, quantizes, runs and serves, with no other
module edited: the tables are the only place that knows tensor names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.arch import ARCHS, Arch, register
from quantkit.arch.mistral import TEXT, Entry
from quantkit.cli import main

RENAMED = {"w1": "fc_gate", "w2": "fc_down", "w3": "fc_up"}
FC_MLP = [
    Entry(f"layers.{{L}}.mlp.{new}.weight", f"model.layers.{{L}}.mlp.{hf}_proj.weight", shape)
    for new, hf, shape in (("fc_gate", "gate", ("ffn", "dim")), ("fc_down", "down", ("dim", "ffn")),
                           ("fc_up", "up", ("ffn", "dim")))
]  # fmt: skip


@pytest.fixture
def variant():
    arch = register(
        Arch("mistral_fc", "MistralForCausalLM", "mistral", "", (("text", TEXT), ("text", FC_MLP)),
             matches=lambda params: params.get("mlp_names") == "fc")  # fmt: skip
    )
    yield arch
    ARCHS.pop(arch.name)


def _renamed_native(src, dst):
    """The tiny Mistral's native folder with its MLP tensors renamed, and the params.json key that says so."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "consolidated.safetensors")
    renamed = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) == 5 and parts[2] == "feed_forward":
            name = f"layers.{parts[1]}.mlp.{RENAMED[parts[3]]}.weight"
        renamed[name] = t
    save_file(renamed, dst / "consolidated.safetensors")
    params = json.loads((dst / "params.json").read_text())
    (dst / "params.json").write_text(json.dumps({**params, "mlp_names": "fc"}))


def test_a_variant_declared_in_arch_converts_quantizes_runs_and_serves(variant, tiny_models, tmp_path):
    base = tiny_models.get("mistral_large")
    native = tmp_path / "native"
    _renamed_native(base["native"], native)
    hf = tmp_path / "hf"
    result = CliRunner().invoke(main, ["convert", str(native), str(hf), "--quiet"])
    assert result.exit_code == 0, result.output + str(result.exception)
    converted = load_file(next(hf.glob("*.safetensors")))
    expected = load_file(next(base["hf"].glob("*.safetensors")))
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    without = CliRunner().invoke(main, ["convert", str(native), str(tmp_path / "refused"), "--quiet"])
    ARCHS.pop(variant.name)  # the same folder without the variant's table: its names are not understood
    try:
        refused = CliRunner().invoke(main, ["convert", str(native), str(tmp_path / "refused2"), "--quiet"])
    finally:
        register(variant)
    assert without.exit_code == 0 and refused.exit_code == 1, refused.output

    q = tmp_path / "q4"
    args = ["quantize", str(hf), str(q), "--bits", "4", "--group-size", "32", "--rows", "2", "--seq-len", "16",
            "--quiet", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    result = CliRunner().invoke(
        main, ["run", str(q), "--prompt", "Hello", "--max-new-tokens", "4", "--device", "cpu", "--quiet", "--json"]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    answer = json.loads(result.output.strip().splitlines()[-1])
    assert answer["input_ids"] and 1 <= len(answer["output_ids"]) <= 4
    packed = load_file(next(q.glob("*.safetensors")))
    assert "model.layers.0.mlp.down_proj.qweight" in packed and "model.layers.0.mlp.down_proj.weight" not in packed

    pytest.importorskip("fastapi")  # the serve extra (CI installs it)
    import httpx
    from serve_server import running_server

    body = {"model": "variant", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
    with running_server(q, name="variant") as (url, _engine):
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model"] == "variant" and 1 <= reply["usage"]["completion_tokens"] <= 4
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
