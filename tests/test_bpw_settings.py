"""--bpw under every setting: the allocator's printed bits equal inspect's figure and the bytes on disk.

The allocator budgets with formats.packed.stored_bits_for before anything is solved; a packed result that stores
more or less than that (once: act order with one group of 128 columns stored no permutation, but was budgeted
one) makes the printed allocation disagree with the model on disk. Checked on a one-layer model whose
out-features are not multiples of 128, for group 32/64/128/none x act order x sym x --rotate.
"""

from __future__ import annotations

import gc
import itertools
import json
import re
import struct

import pytest
import torch
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.formats.packed import stored_bits_for
from quantkit.formats.registry import get_format
from quantkit.quant.capture import LinearSpec, QuantSettings, solve_linear

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = ("32", "64", "128", "none")
COMBOS = list(itertools.product(GROUPS, (True, False), (True, False), (True, False)))  # group, act, sym, rotate


def _bits_on_disk(folder) -> int:
    """Bits of every tensor of the decoder's packed linears: the byte ranges in the safetensors headers."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, entry in header.items():
            if ".layers." in name and name.rpartition(".")[2] != "weight":
                start, end = entry["data_offsets"]
                total += (end - start) * 8
    return total


@pytest.fixture(scope="module")
def src(tiny_models):
    """The model; the session's objects so far are frozen out of the garbage collector meanwhile, because each
    quantize run collects garbage between steps and, in a test session, each full collection costs ~0.5 s."""
    folder = tiny_models.get("mistral_odd")["hf"]
    gc.freeze()
    yield folder
    gc.unfreeze()


@pytest.mark.slow
@pytest.mark.parametrize("group,act,sym,rotate", COMBOS)
def test_printed_allocation_equals_inspect_and_disk(src, tmp_path, group, act, sym, rotate):
    out = tmp_path / "q"
    args = ["quantize", str(src), str(out), "--bpw", "3.5", "--group-size", group, "--rows", "1", "--seq-len", "8",
            "--measure-rows", "1", "--quiet", "--act-order" if act else "--no-act-order"]  # fmt: skip
    args += [] if sym else ["--asym"]
    args += ["--rotate"] if rotate else []
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    m = re.search(r"allocation: ([\d.]+) bits per decoder weight for --bpw 3.5 \(([\d,]+) bits", result.output)
    assert m, result.output
    printed_bits = int(m.group(2).replace(",", ""))
    report = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)["quantized"]
    numel = report["decoder_quantized_params"]
    assert _bits_on_disk(out) == printed_bits
    assert report["decoder_bpw"] == printed_bits / numel
    assert f"{report['decoder_bpw']:.4f}" == m.group(1)
    layer = re.search(r"layer 1/1: ([\d.]+) bits per weight", result.output)
    assert layer and layer.group(1) == f"{report['layer_bpw']['0']:.2f}"


@pytest.mark.parametrize("k", [96, 128, 160, 384])
def test_cost_model_equals_the_packer_to_the_bit(k):
    """stored_bits_for against the packed tensors of real solver results, every setting and layout kind."""
    g = torch.Generator().manual_seed(k)
    W = torch.randn(40, k, generator=g)
    x = torch.randn(64, k, generator=g)
    H = x.T @ x
    for group, act, sym, rot, static in itertools.product((32, 64, 128, None), *[(True, False)] * 4):
        if group is not None and k % group or (static and not act):
            continue
        s = QuantSettings(group_size=group, sym=sym, act_order=act, static_groups=static)
        seed = 3 if rot else None
        specs = [LinearSpec(3, group, seed), LinearSpec(2, None, seed)]
        if group is not None and k > group and not static:
            specs.append(LinearSpec(((4, group), (3, k - group)), group, seed))
        for spec in specs:
            solved = solve_linear(W, H, spec, s)
            packed = sum(t.numel() * t.element_size() * 8 for t in get_format("quantkit").tensors(solved).values())
            budget = stored_bits_for(
                40, k, spec.bits if isinstance(spec.bits, int) else list(spec.bits), spec.group_size, asym=not sym,
                act_order=act, static_groups=static, had_in=rot,
            )  # fmt: skip
            assert packed == budget, (group, act, sym, rot, static, spec)
