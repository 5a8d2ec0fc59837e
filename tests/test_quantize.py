"""quantkit quantize: the layer-by-layer pipeline, the GPTQ export, streaming, resume and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from native_models import read_safetensors
from same_output import assert_same_files, one_thread_env

from quantkit.cli import main
from quantkit.quant.pipeline import quantize
from quantkit.quant.settings import QuantizeOptions, QuantSettings

FAST = ["--rows", "4", "--seq-len", "64", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def unpack_gptq_4bit(t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Dequantize one GPTQ v1 4-bit linear with plain bit arithmetic: 8 codes per int32, LSB first, zero - 1 stored."""
    qweight, qzeros = t[f"{prefix}.qweight"].to(torch.int64) & 0xFFFFFFFF, t[f"{prefix}.qzeros"].to(torch.int64)
    scales, g_idx = t[f"{prefix}.scales"].float(), t[f"{prefix}.g_idx"].long()
    shifts = torch.arange(8) * 4
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])  # [in, out]
    z = (((qzeros & 0xFFFFFFFF)[:, :, None] >> shifts) & 15).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    return (scales[g_idx] * (q - z[g_idx])).T  # [out, in]


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    """The tiny Mistral-Large-like model quantized to 4 and 2 bits, g32, act order."""
    src = tiny_models.get("mistral_large")["hf"]
    root = tmp_path_factory.mktemp("q")
    outs = {}
    for bits in (4, 2):
        dst = root / f"q{bits}"
        result = run("quantize", src, dst, "--bits", bits, "--group-size", "32", *FAST)
        assert result.exit_code == 0, result.output + str(result.exception)
        outs[bits] = dst
    return src, outs


def test_gptq_export_matches_spec(quantized):
    src, outs = quantized
    out, float_t = read_safetensors(outs[4]), read_safetensors(src)
    cfg = json.loads((outs[4] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"]) == ("gptq", 4, 32, True, True)
    assert q["checkpoint_format"] == "gptq"
    prefix = "model.layers.1.mlp.down_proj"
    assert f"{prefix}.weight" not in out
    assert out[f"{prefix}.qweight"].dtype == torch.int32 and out[f"{prefix}.qweight"].shape == (128 * 4 // 32, 64)
    assert out[f"{prefix}.qzeros"].shape == (128 // 32, 64 * 4 // 32)
    assert out[f"{prefix}.scales"].dtype == torch.float16 and out[f"{prefix}.scales"].shape == (4, 64)
    assert out[f"{prefix}.g_idx"].dtype == torch.int32 and sorted(out[f"{prefix}.g_idx"].tolist()) == sorted(
        [i // 32 for i in range(128)]
    )
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(out[name], float_t[name])  # 16-bit parts are copied as they are
    w = float_t[f"{prefix}.weight"]
    deq = unpack_gptq_4bit(out, prefix)
    rel = (deq - w).norm() / w.norm()
    assert 0 < rel < 0.2, rel
    assert (outs[4] / "tokenizer.model.v3").is_file() and (outs[4] / "README.md").read_text().count("| Bits | 4 |")
    readme = (outs[4] / "README.md").read_text()  # damp is a fraction: no `%` beside 0.01
    assert "| Damp | 0.01 (fraction of the mean Hessian diagonal) |" in readme and "Damp %" not in readme


def test_dry_run_prints_plan_writes_nothing_and_sizes_the_output(quantized, tmp_path):
    src, outs = quantized
    dst = tmp_path / "dry"
    result = run("quantize", src, dst, "--bits", 4, "--group-size", 32, "--dry-run", *FAST)
    assert result.exit_code == 0, result.output
    assert not dst.exists() and not (tmp_path / ".dry.quantkit-work").exists()
    lines = dict(line.split(": ", 1) for line in result.output.strip().splitlines())
    assert lines["decoder layers"] == "2" and lines["peak memory"].endswith(" GB RAM")
    plan = quantize(src, dst, QuantizeOptions(QuantSettings(4, 32), dry_run=True, rows=4, seq_len=64), progress=False)
    actual = sum(f.stat().st_size for f in outs[4].glob("*.safetensors"))
    assert abs(plan.output_bytes - actual) < 0.05 * actual, (plan.output_bytes, actual)
    assert plan.peak_ram_bytes > 500_000_000 and not dst.exists()


def _dequantized_logits(src: Path, out: Path, ids: torch.Tensor) -> torch.Tensor:
    from quantkit.formats.gptq import gptq_unpack
    from quantkit.model.load import load_model

    model = load_model(src, device="cpu", dtype="float32")
    t = read_safetensors(out)
    for name, mod in model.named_modules():
        key = f"model.{name}" if not name.startswith("lm_head") else name
        if f"{key}.qweight" in t:
            bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits"]
            qz, scales, zeros, g_idx = gptq_unpack(
                {k: t[f"{key}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits
            )
            g = g_idx.long()
            mod.weight.data = (scales.float()[g].T * (qz - zeros[g].T)).float()
    with torch.no_grad():
        return model(ids)


def test_more_bits_track_the_float_model_closer(quantized):
    from quantkit.model.load import load_model

    src, outs = quantized
    ids = torch.randint(100, 30000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(src, device="cpu", dtype="float32")(ids)
    err = {b: float((_dequantized_logits(src, outs[b], ids) - ref).norm() / ref.norm()) for b in outs}
    assert 0 < err[4] < err[2], err


def test_only_one_layer_resident(tiny_models, tmp_path, monkeypatch):
    from quantkit.model import load as load_mod
    from quantkit.quant import job as job_mod

    resident, peak = set(), [0]
    orig_load, orig_unload = load_mod.Checkpoint.load, load_mod.unload

    def load(self, model, name="", *a, **k):
        if name.startswith("layers."):
            resident.add(name)
            peak[0] = max(peak[0], len(resident))
        assert name != "", "the whole model must never be loaded"
        return orig_load(self, model, name, *a, **k)

    def unload(module):
        for n in list(resident):
            resident.discard(n)
        orig_unload(module)

    monkeypatch.setattr(load_mod.Checkpoint, "load", load)
    monkeypatch.setattr("quantkit.quant.looper.unload", unload)
    src = tiny_models.get("mixtral")["hf"]
    offload = tmp_path / "offload"
    seen = []
    orig_store = job_mod.Job.store

    def store(self, name, *a):
        st = orig_store(self, name, *a)
        seen.append(st.path)
        return st

    monkeypatch.setattr(job_mod.Job, "store", store)
    result = run(
        "quantize", src, tmp_path / "out", "--bits", "4", "--group-size", "32", "--offload-dir", offload, *FAST
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    assert peak[0] == 1
    assert not resident
    assert seen and all(p.parent == offload for p in seen)  # hidden states lived in the offload dir
    assert not list(offload.iterdir())  # and were removed after the finished run
    assert not (tmp_path / ".out.quantkit-work").exists()  # a finished job removes its work dir


CRASH = """
import os, signal, sys
from quantkit.quant import job
orig = job.Job.finish
def finish(self, step, *a, **k):
    orig(self, step, *a, **k)
    if step == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
job.Job.finish = finish
from quantkit.cli import main
main(sys.argv[2:])
"""


def test_resume_after_kill_is_byte_identical(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    args = ["quantize", str(src), "", "--bits", "3", "--group-size", "32", *FAST]
    env = one_thread_env()
    whole, crashed = tmp_path / "a" / "out", tmp_path / "b" / "out"
    whole.parent.mkdir()
    crashed.parent.mkdir()
    subprocess.run([sys.executable, "-m", "quantkit", *[a or str(whole) for a in args]], check=True, env=env)
    first = subprocess.run([sys.executable, "-c", CRASH, "layer.0", *[a or str(crashed) for a in args]], env=env)
    assert first.returncode == -9 and not crashed.exists()
    work = crashed.parent / ".out.quantkit-work"
    assert json.loads((work / "job.json").read_text())["done"] == ["embed", "layer.0"]
    second = subprocess.run(
        [sys.executable, "-m", "quantkit", *[a or str(crashed) for a in args]], env=env, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr
    assert "resuming at layer 1/2" in second.stdout + second.stderr
    assert_same_files(whole, crashed)
    assert not work.exists()  # the finished job cleaned up after itself

    # An unfinished job refuses other settings, and --restart discards it.
    third = tmp_path / "c" / "out"
    third.parent.mkdir()
    assert (
        subprocess.run([sys.executable, "-c", CRASH, "layer.0", *[a or str(third) for a in args]], env=env).returncode
        == -9
    )
    other = run("quantize", src, third, "--bits", "4", "--group-size", "32", *FAST)
    assert other.exit_code == 1 and "other settings" in other.stderr and "--restart" in other.stderr
    assert run("quantize", src, third, "--bits", "4", "--group-size", "32", "--restart", *FAST).exit_code == 0


def test_bad_input(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    dst = tmp_path / "dst"

    def error(result, needle):
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert not dst.exists()

    error(run("quantize", src, dst, "--bits", "9", *FAST), "--bits must be between 2 and 8")
    error(run("quantize", src, dst, "--bits", "5", *FAST), "GPTQ format stores 2, 3, 4 or 8 bits")
    error(run("quantize", src, dst, "--group-size", "128", *FAST), "does not divide")
    error(run("quantize", tiny_models.get("mistral_large")["native"], dst, *FAST), "no config.json")
    unsupported = tmp_path / "weird"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    error(run("quantize", unsupported, dst, *FAST), "GPT2LMHeadModel is not supported")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    error(run("quantize", src, dst, "--group-size", "32", "--dataset", empty, *FAST), "empty")
    wrong_field = tmp_path / "data.jsonl"
    wrong_field.write_text('{"body": "hello there"}\n')
    error(run("quantize", src, dst, "--group-size", "32", "--dataset", wrong_field, *FAST), "text")
    result = run("quantize", src, "/proc/quantkit-out", "--group-size", "32", *FAST)  # not writable, even by root
    assert result.exit_code == 1 and result.stderr.startswith("error: cannot write to /proc")


def test_vision_quantize(tiny_models, tmp_path):
    """--vision quantize packs every vision linear (calibrated on the bundled images); the runtime loads them."""
    from quantkit.kernels.qlinear import QuantLinear
    from quantkit.quantized_model import load_any

    src = tiny_models.get("pixtral_12b")["hf"]
    keep, quant = tmp_path / "keep", tmp_path / "quant"
    args = ["--format", "quantkit", "--bits", "4", "--group-size", "32", *FAST]
    assert run("quantize", src, keep, *args).exit_code == 0
    result = run("quantize", src, quant, "--vision", "quantize", *args)
    assert result.exit_code == 0, result.output + str(result.exception)
    t = read_safetensors(quant)
    assert "vision_tower.transformer.layers.1.feed_forward.down_proj.qmeta" in t  # the default (vLLM) names
    assert "vision_tower.transformer.layers.1.feed_forward.down_proj.weight" not in t
    assert "vision_tower.patch_conv.weight" in t and "multi_modal_projector.linear_1.weight" in t
    assert not any(k.startswith("vision_tower.") and k.endswith(".qmeta") for k in read_safetensors(keep))
    model = load_any(quant, "cpu", "float32", "torch", progress=False, fuse=False)  # every linear on its own
    vision_q = [n for n, m in model.vision_tower.named_modules() if isinstance(m, QuantLinear)]
    assert len(vision_q) == 2 * 7
    reference = load_any(keep, "cpu", "float32", "torch", progress=False)
    image = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.image_features([image]), reference.image_features([image])
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 0.5, rel
    lines = result.stderr.strip().splitlines() + result.output.strip().splitlines()
    assert any(line.startswith("vision layer 2/2: 4 bits") for line in lines)
    assert "no vision tower" in run("quantize", tiny_models.get("mistral_large")["hf"], tmp_path / "x", "--vision",
                                    "quantize", *args).stderr  # fmt: skip


def test_model_card_with_saved_eval(quantized):
    src, outs = quantized
    result = run("eval", outs[4], "--reference", src, "--rows", "2", "--seq-len", "32", "--save", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    figures = json.loads((outs[4] / "eval.json").read_text())
    assert figures["perplexity"] == json.loads(result.output.strip().splitlines()[-1])["perplexity"]
    card = run("inspect", outs[4], "--card").output
    assert "| Format | gptq |" in card and "| Group size | 32 |" in card and "| Act order | True |" in card
    assert "| Rows x seq len | 4 x 64 |" in card
    assert "| Damp | 0.01 (fraction of the mean Hessian diagonal) |" in card and "Damp %" not in card
    assert f"| Perplexity | {figures['perplexity']:.4f} " in card and f"{figures['kl_divergence']:.5f}" in card
    assert f"| Top-1 agreement | {figures['top1_agreement']:.2%} |" in card  # the unit `quantkit eval` prints
    rows = json.loads(run("inspect", outs[4], "--card", "--json").output)  # --json applies to the card too
    assert rows["Format"] == "gptq" and rows["Top-1 agreement"] == f"{figures['top1_agreement']:.2%}"
    assert run("inspect", src, "--card").exit_code == 1  # a float folder has no card


def test_job_steps_are_named_and_a_run_stopped_after_the_head_resumes_from_the_names(
    tiny_models, tmp_path, monkeypatch, one_thread
):
    """job.json lists the finished steps by name ("embed", "layer.i", "head"); a rerun picks up after them."""
    from quantkit.quant import job as job_mod

    src = tiny_models.get("mistral_large")["hf"]
    args = ["--bits", "4", "--group-size", "32", "--head-bits", "8", *FAST]
    whole, cut = tmp_path / "a" / "out", tmp_path / "b" / "out"
    whole.parent.mkdir()
    cut.parent.mkdir()
    first = run("quantize", src, whole, *args)
    assert first.exit_code == 0, first.output
    orig, ran = job_mod.Job.finish, []

    def finish(self, step, *a, **k):
        orig(self, step, *a, **k)
        ran.append(step)
        if step == "head":
            raise KeyboardInterrupt  # stands in for a kill right after the head step was recorded

    monkeypatch.setattr(job_mod.Job, "finish", finish)
    assert run("quantize", src, cut, *args).exit_code == 130
    state = json.loads((cut.parent / ".out.quantkit-work" / "job.json").read_text())
    assert state["steps"] == state["done"] == ["embed", "layer.0", "layer.1", "head"] == ran
    assert sorted(p.name for p in (cut.parent / ".out.quantkit-work" / "layers").iterdir()) == [
        "head.safetensors", "layer.0.safetensors", "layer.1.safetensors"]  # fmt: skip
    ran.clear()
    again = run("quantize", src, cut, *args)
    assert again.exit_code == 0, again.output
    assert ran == [] and "resuming at layer 2/2" in again.output  # nothing recomputed
    assert_same_files(whole, cut)


def test_a_work_dir_of_an_older_version_with_numbered_steps_is_refused(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    work = tmp_path / ".out.quantkit-work"
    work.mkdir()
    old = {"version": 1, "fingerprint": "0123456789abcdef", "settings": {}, "done": 2, "current": "a"}
    (work / "job.json").write_text(json.dumps(old))
    result = run("quantize", src, tmp_path / "out", "--bits", "4", "--group-size", "32", *FAST)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "older quantkit version" in result.stderr and "--restart" in result.stderr
    assert json.loads((work / "job.json").read_text()) == old  # refused, not rewritten
    restarted = run("quantize", src, tmp_path / "out", "--bits", "4", "--group-size", "32", "--restart", *FAST)
    assert restarted.exit_code == 0, restarted.output


def test_job_refuses_steps_out_of_order_and_a_changed_step_list(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.quant.job import Job

    job = Job(tmp_path / "w", {"a": 1}, ["embed", "layer.0", "head"])
    job.finish("embed", wrote_rows=True)
    with pytest.raises(QuantkitError, match="out of order"):
        job.finish("head")
    assert Job(tmp_path / "w", {"a": 1}, ["embed", "layer.0", "head"]).next == "layer.0"  # resumes by name
    with pytest.raises(QuantkitError, match="other settings"):
        Job(tmp_path / "w", {"a": 1}, ["embed", "layer.0", "vision"])


def test_dry_run_states_an_expected_time(tiny_models, tmp_path):
    """--dry-run states an expected time for a plain and a --bpw run. How close it is to real runs is
    benchmarks/bench_quantize_speed.py's to show (a wall-clock comparison here fails on a busy machine); how it
    grows with the work is test_expected_time_grows_with_rows_sequence_and_measurement's (fixed rates)."""
    src = tiny_models.get("mistral_large")["hf"]
    o = QuantizeOptions(QuantSettings(4, 32), rows=4, seq_len=64, dry_run=True)
    for opts in (o, replace(o, bpw=4.0, fmt="quantkit")):
        seconds = quantize(src, tmp_path / "dry", opts, progress=False).seconds
        assert seconds is not None and 0 < seconds < float("inf")
    assert not (tmp_path / "dry").exists()
    said = run("quantize", src, tmp_path / "dry", "--bits", 4, "--group-size", 32, "--dry-run", *FAST).output
    assert "expected time: about " in said and "an estimate" in said, said


def test_expected_time_grows_with_rows_sequence_and_measurement():
    from dataclasses import replace

    from quantkit.quant.estimate import MeasureWork, Rates, estimate_seconds

    rates = Rates(matmul=1e11, cholesky=1e10, column=2e-4, element=1e-9, op=1e-5, fsync=1e-3, collect=0.05)
    shapes = [{"a.q": (256, 256), "a.k": (64, 256), "a.v": (64, 256), "a.o": (256, 256), "m.up": (512, 256),
               "m.down": (256, 512)}] * 4  # fmt: skip
    groups = [["a.q", "a.k", "a.v"], ["a.o"], ["m.up"], ["m.down"]]

    def est(rows=8, seq_len=128, **kw):
        return estimate_seconds(shapes, groups, rows=rows, seq_len=seq_len, attn_dim=256, rates=rates, **kw)

    base = est()
    assert 0 < base < est(rows=16) < est(rows=64) and est(seq_len=512) > base
    row_part = est(rows=16) - base  # what 8 more rows cost: the same again for 8 more
    assert est(rows=24) - est(rows=16) == pytest.approx(row_part, rel=1e-6)
    block_of = lambda n: "attn" if n[0] == "a" else "mlp"  # noqa: E731
    role_of = lambda n: n.split(".")[1]  # noqa: E731
    work = MeasureWork(rows=4, error_rows=2, candidates={"attn": 16, "mlp": 16},
                       settings={"attn": {"q": 4, "k": 4, "v": 4, "o": 4}, "mlp": {"up": 4, "down": 4}},
                       fronts={"attn": 4, "mlp": 4}, last={"attn": "o", "mlp": "down"}, probes=3, probe_tokens=128,
                       head=(1000, 256))  # fmt: skip
    measured = est(measure=work, block_of=block_of, role_of=role_of)
    assert measured > base + 4 * 4 * 6 * 256 * rates.column  # 4 solves of every linear, at least
    more = replace(work, settings={b: {r: 8 for r in roles} for b, roles in work.settings.items()})
    assert est(measure=more, block_of=block_of, role_of=role_of) > measured
    assert est(head=(1000, 256)) > base
