"""The reliability suite (issue 17): hostile input to every command, and `kill -9` at random moments.

Bad input: each case must exit 1 with one `error:` line naming the problem, no traceback, nothing at DST, the
source's bytes unchanged, within a time limit. Kills: convert, `quantize --bits 4` and `quantize --bpw 3.0` are
killed at seeded random moments of their work, rerun, and must give output byte-identical to an uninterrupted run,
with DST never half-written and nothing stale left. CI runs 2 kills per job (QUANTKIT_KILLS, QUANTKIT_KILL_SEED
change that); benchmarks/reliability.py runs more and prints the figures.
Run alone with `pytest -m reliability`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import main

pytestmark = pytest.mark.reliability
FAST = ["--rows", "4", "--seq-len", "64", "--quiet"]
G32 = ["--group-size", "32", *FAST]
TIME_LIMIT_S = 60  # each bad input, on a shared 2-core machine; they take about a second
ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """The tiny Mistral model native, converted, and quantized to GPTQ 4-bit."""
    m = tiny_models.get("mistral_large")
    q = tmp_path_factory.mktemp("rel") / "q4"
    result = CliRunner().invoke(main, ["quantize", str(m["hf"]), str(q), "--bits", "4", *G32])
    assert result.exit_code == 0, result.output
    return {"native": m["native"], "hf": m["hf"], "q4": q, "vlm": tiny_models.get("pixtral_12b")["hf"]}


def copy(folder: Path, tmp: Path, name: str = "src") -> Path:
    dst = tmp / name
    shutil.copytree(folder, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def rewrite_tensors(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb as far as any decoder can tell)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def messages_with_image(tmp: Path, url: str) -> Path:
    path = tmp / "messages.json"
    content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": url}}]
    path.write_text(json.dumps([{"role": "user", "content": content}]))
    return path


# Each case: (command, needle in the error line, setup(models, tmp) -> (args after the command, source, dst)).
CASES: dict[str, tuple[str, str, object]] = {}


def case(name: str, command: str, needle: str):
    def register(setup):
        CASES[name] = (command, needle, setup)
        return setup

    return register


# ---- convert -------------------------------------------------------------------------------------------------
@case("convert-truncated-safetensors", "convert", "truncated")
def _(m, tmp):
    src = copy(m["native"], tmp)
    f = src / "consolidated.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-corrupt-header", "convert", "corrupt")
def _(m, tmp):
    src = copy(m["native"], tmp)
    f = src / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"{not json" + data[17:])
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-huge-header-length", "convert", "header length")
def _(m, tmp):
    src = copy(m["native"], tmp)
    f = src / "consolidated.safetensors"
    f.write_bytes((2**60).to_bytes(8, "little") + f.read_bytes()[8:])
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-short-file", "convert", "shorter than 8 bytes")
def _(m, tmp):
    src = copy(m["native"], tmp)
    (src / "consolidated.safetensors").write_bytes(b"\1\2")
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-wrong-shape", "convert", "layers.0.attention.wq.weight")
def _(m, tmp):
    src = copy(m["native"], tmp)
    rewrite_tensors(src / "consolidated.safetensors", lambda t: t.update({
        "layers.0.attention.wq.weight": t["layers.0.attention.wq.weight"][:-1]}))  # fmt: skip
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-missing-tensor", "convert", "missing")
def _(m, tmp):
    src = copy(m["native"], tmp)
    rewrite_tensors(src / "consolidated.safetensors", lambda t: t.pop("norm.weight"))
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-extra-tensor", "convert", "surprise.weight")
def _(m, tmp):
    src = copy(m["native"], tmp)
    rewrite_tensors(src / "consolidated.safetensors", lambda t: t.update({"surprise.weight": t["norm.weight"].clone()}))
    return [src, tmp / "out"], src, tmp / "out"


@case("params-dim-string", "convert", "'dim' must be a positive whole number")
def _(m, tmp):
    src = copy(m["native"], tmp)
    edit_json(src / "params.json", dim="abc")
    return [src, tmp / "out"], src, tmp / "out"


@case("params-n-heads-list", "convert", "'n_heads' must be a positive whole number")
def _(m, tmp):
    src = copy(m["native"], tmp)
    edit_json(src / "params.json", n_heads=[4])
    return [src, tmp / "out"], src, tmp / "out"


@case("params-n-layers-fraction", "convert", "'n_layers' must be a positive whole number, got 4.5")
def _(m, tmp):
    src = copy(m["native"], tmp)
    edit_json(src / "params.json", n_layers=4.5)
    return [src, tmp / "out"], src, tmp / "out"


@case("params-negative-hidden-dim", "convert", "'hidden_dim' must be a positive whole number")
def _(m, tmp):
    src = copy(m["native"], tmp)
    edit_json(src / "params.json", hidden_dim=-5)
    return [src, tmp / "out"], src, tmp / "out"


@case("params-not-json", "convert", "params.json is not valid JSON")
def _(m, tmp):
    src = copy(m["native"], tmp)
    (src / "params.json").write_text("{dim: 64")
    return [src, tmp / "out"], src, tmp / "out"


@case("index-path-escape", "convert", "outside the checkpoint folder")
def _(m, tmp):
    src = copy(m["native"], tmp)
    shutil.copy(src / "consolidated.safetensors", tmp / "outside.safetensors")
    names = list(load_file(src / "consolidated.safetensors"))
    index = {"weight_map": dict.fromkeys(names, "../outside.safetensors")}
    (src / "consolidated.safetensors.index.json").write_text(json.dumps(index))
    return [src, tmp / "out"], src, tmp / "out"


@case("pickle-checkpoint", "convert", "pickle files are not loaded")
def _(m, tmp):
    src = copy(m["native"], tmp)
    os.replace(src / "consolidated.safetensors", src / "consolidated.00.pth")
    return [src, tmp / "out"], src, tmp / "out"


@case("index-names-pickle", "convert", "pickle files are not loaded")
def _(m, tmp):
    src = copy(m["native"], tmp)
    names = list(load_file(src / "consolidated.safetensors"))
    (src / "consolidated.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "x.bin")}))
    return [src, tmp / "out"], src, tmp / "out"


@case("convert-corrupt-tokenizer", "convert", "tokenizer.model.v3")
def _(m, tmp):
    src = copy(m["native"], tmp)
    (src / "tokenizer.model.v3").write_bytes(b"\0garbage" * 10)
    return [src, tmp / "out"], src, tmp / "out"


@case("dst-inside-src", "convert", "inside the source folder")
def _(m, tmp):
    src = copy(m["native"], tmp)
    return [src, src / "out"], src, src / "out"


@case("dst-equals-src", "convert", "inside the source folder")
def _(m, tmp):
    src = copy(m["native"], tmp)
    return [src, src, "--force"], src, None


@case("dst-parent-of-src-force", "convert", "contains the source folder")
def _(m, tmp):
    src = copy(m["native"], tmp / "a" / "b")
    return [src, tmp / "a", "--force"], tmp / "a", None


@case("dst-is-a-file", "convert", "exists and is not a folder")
def _(m, tmp):
    src = copy(m["native"], tmp)
    (tmp / "out").write_text("a file")
    return [src, tmp / "out"], src, None


@case("dst-unwritable", "convert", "cannot write to /proc")
def _(m, tmp):
    src = copy(m["native"], tmp)
    return [src, "/proc/quantkit-out"], src, Path("/proc/quantkit-out")


@case("bad-shard-size", "convert", "cannot parse size")
def _(m, tmp):
    src = copy(m["native"], tmp)
    return [src, tmp / "out", "--max-shard-size", "huge"], src, tmp / "out"


# ---- quantize ------------------------------------------------------------------------------------------------
@case("quantize-bits-9", "quantize", "--bits must be between 2 and 8")
def _(m, tmp):
    return [m["hf"], tmp / "out", "--bits", "9", *G32], m["hf"], tmp / "out"


@case("quantize-group-size-100", "quantize", "--group-size must be auto, 32, 64, 128 or none")
def _(m, tmp):
    return [m["hf"], tmp / "out", "--group-size", "100", *FAST], m["hf"], tmp / "out"


@case("quantize-group-size-not-dividing", "quantize", "does not divide")
def _(m, tmp):
    return [m["hf"], tmp / "out", "--group-size", "128", *FAST], m["hf"], tmp / "out"


@case("quantize-rows-0", "quantize", "--rows must be at least 1")
def _(m, tmp):
    return (
        [m["hf"], tmp / "out", "--group-size", "32", "--quiet", "--rows", "0", "--seq-len", "64"],
        m["hf"],
        tmp / "out",
    )


@case("quantize-native-src", "quantize", "no config.json")
def _(m, tmp):
    return [m["native"], tmp / "out", *G32], m["native"], tmp / "out"


@case("quantize-empty-dataset", "quantize", "empty")
def _(m, tmp):
    (tmp / "d.jsonl").write_text("")
    return [m["hf"], tmp / "out", "--dataset", tmp / "d.jsonl", *G32], m["hf"], tmp / "out"


@case("quantize-binary-dataset", "quantize", "d.txt")
def _(m, tmp):
    (tmp / "d.txt").write_bytes(bytes(range(256)) * 40)
    return [m["hf"], tmp / "out", "--dataset", tmp / "d.txt", *G32], m["hf"], tmp / "out"


@case("quantize-fieldless-dataset", "quantize", "text")
def _(m, tmp):
    (tmp / "d.jsonl").write_text('{"body": "hello there"}\n')
    return [m["hf"], tmp / "out", "--dataset", tmp / "d.jsonl", *G32], m["hf"], tmp / "out"


@case("quantize-unreachable-hub", "quantize", "unreachable")
def _(m, tmp):
    return [m["hf"], tmp / "out", "--dataset", "nosuchuser/nosuchdata", *G32], m["hf"], tmp / "out"


@case("quantize-unsupported-arch", "quantize", "GPT2LMHeadModel is not supported")
def _(m, tmp):
    src = copy(m["hf"], tmp)
    edit_json(src / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return [src, tmp / "out", *G32], src, tmp / "out"


@case("quantize-config-hidden-size-string", "quantize", "'hidden_size' must be a positive whole number")
def _(m, tmp):
    src = copy(m["hf"], tmp)
    edit_json(src / "config.json", hidden_size="abc")
    return [src, tmp / "out", *G32], src, tmp / "out"


@case("quantize-into-parent-force", "quantize", "contains the source folder")
def _(m, tmp):
    src = copy(m["hf"], tmp / "a")
    return [src, tmp / "a", "--force", *G32], tmp / "a", None


# ---- run -----------------------------------------------------------------------------------------------------
@case("run-max-new-tokens-0", "run", "--max-new-tokens must be at least 1")
def _(m, tmp):
    return [m["hf"], "--prompt", "hi", "--max-new-tokens", "0", "--quiet"], m["hf"], None


@case("run-missing-image", "run", "image file not found")
def _(m, tmp):
    return [m["vlm"], "--prompt", "hi", "--image", tmp / "none.png", "--quiet"], m["vlm"], None


@case("run-corrupt-image", "run", "not a readable image")
def _(m, tmp):
    (tmp / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return [m["vlm"], "--prompt", "hi", "--image", tmp / "x.png", "--quiet"], m["vlm"], None


@case("run-decompression-bomb", "run", "too many pixels")
def _(m, tmp):
    png_header_only(tmp / "bomb.png", 60000, 60000)
    return [m["vlm"], "--prompt", "hi", "--image", tmp / "bomb.png", "--quiet"], m["vlm"], None


@case("run-unsupported-quant-method", "run", "'awq' is not supported")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    edit_json(src / "config.json", quantization_config={"quant_method": "awq"})
    return [src, "--prompt", "hi", "--quiet"], src, None


@case("run-quantization-config-string", "run", "quantization_config must be a JSON object")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    edit_json(src / "config.json", quantization_config="gptq")
    return [src, "--prompt", "hi", "--quiet"], src, None


@case("run-truncated-packed-tensor", "run", "qweight")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    key = "model.layers.0.mlp.down_proj.qweight"
    rewrite_tensors(src / "model-00001-of-00001.safetensors", lambda t: t.update({key: t[key][:-4]}))
    return [src, "--prompt", "hi", "--quiet"], src, None


# ---- eval ----------------------------------------------------------------------------------------------------
@case("eval-seq-len-beyond-context", "eval", "longer than the model's context")
def _(m, tmp):
    return [m["hf"], "--seq-len", "10000000", "--rows", "1", "--quiet"], m["hf"], None


@case("eval-empty-dataset", "eval", "empty")
def _(m, tmp):
    (tmp / "d.txt").write_text("")
    return [m["hf"], "--dataset", tmp / "d.txt", "--rows", "1", "--seq-len", "16", "--quiet"], m["hf"], None


@case("eval-unreachable-hub", "eval", "unreachable")
def _(m, tmp):
    return [m["hf"], "--dataset", "nosuchuser/nosuchdata", "--rows", "1", "--seq-len", "16", "--quiet"], m["hf"], None


# ---- tokenize ------------------------------------------------------------------------------------------------
@case("tokenize-content-not-text", "tokenize", "content")
def _(m, tmp):
    (tmp / "m.json").write_text(json.dumps([{"role": "user", "content": 12345}]))
    return [m["hf"], "--messages", tmp / "m.json"], m["hf"], None


@case("tokenize-nested-100k", "tokenize", "nested too deeply")
def _(m, tmp):
    (tmp / "m.json").write_text("[" * 100_000 + "]" * 100_000)
    return [m["hf"], "--messages", tmp / "m.json"], m["hf"], None


@case("tokenize-bad-base64", "tokenize", "invalid base64")
def _(m, tmp):
    return [m["vlm"], "--messages", messages_with_image(tmp, "data:image/png;base64,!!!notbase64")], m["vlm"], None


@case("tokenize-http-url", "tokenize", "remote image URLs are not supported")
def _(m, tmp):
    return [m["vlm"], "--messages", messages_with_image(tmp, "http://example.com/a.png")], m["vlm"], None


@case("tokenize-data-uri-not-image", "tokenize", "not a readable image")
def _(m, tmp):
    url = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    return [m["vlm"], "--messages", messages_with_image(tmp, url)], m["vlm"], None


@case("tokenize-invalid-json", "tokenize", "invalid JSON")
def _(m, tmp):
    (tmp / "m.json").write_text('[{"role": "user", ')
    return [m["hf"], "--messages", tmp / "m.json"], m["hf"], None


@case("tokenize-wrong-role", "tokenize", "role")
def _(m, tmp):
    (tmp / "m.json").write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    return [m["hf"], "--messages", tmp / "m.json"], m["hf"], None


@case("tokenize-no-tokenizer", "tokenize", "tokenizer")
def _(m, tmp):
    src = copy(m["hf"], tmp)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    (tmp / "m.json").write_text(json.dumps([{"role": "user", "content": "hi"}]))
    return [src, "--messages", tmp / "m.json"], src, None


# ---- inspect -------------------------------------------------------------------------------------------------
@case("inspect-truncated-packed-tensor", "inspect", "qweight")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    key = "model.layers.0.mlp.down_proj.qweight"
    rewrite_tensors(src / "model-00001-of-00001.safetensors", lambda t: t.update({key: t[key][:-4]}))
    return [src], src, None


@case("inspect-quantization-config-string", "inspect", "quantization_config must be a JSON object")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    edit_json(src / "config.json", quantization_config="gptq")
    return [src], src, None


@case("inspect-unsupported-quant-method", "inspect", "'awq' is not supported")
def _(m, tmp):
    src = copy(m["q4"], tmp)
    edit_json(src / "config.json", quantization_config={"quant_method": "awq"})
    return [src], src, None


@case("inspect-truncated-safetensors", "inspect", "truncated")
def _(m, tmp):
    src = copy(m["hf"], tmp)
    f = src / "model-00001-of-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    return [src], src, None


@case("inspect-not-a-model", "inspect", "neither config.json")
def _(m, tmp):
    (tmp / "empty").mkdir()
    return [tmp / "empty"], tmp / "empty", None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(models, tmp_path, name):
    command, needle, setup = CASES[name]
    args, source, dst = setup(models, tmp_path)
    before = tree_hash(source)
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [command, *map(str, args)])
    elapsed = time.perf_counter() - t0
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, (result.output, result.exc_info)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert tree_hash(source) == before, "the source changed"
    if dst is not None:
        assert not Path(dst).exists() or dst == source, "something was written at DST"
        assert not [p for p in Path(dst).parent.glob(f".{Path(dst).name}.*")], "a temporary folder or lock was left"
    assert elapsed < TIME_LIMIT_S, f"{name} took {elapsed:.1f} s"


def test_the_suite_covers_every_command_with_thirty_cases():
    commands = {c for c, _, _ in CASES.values()}
    assert len(CASES) >= 30 and commands == {"convert", "quantize", "run", "eval", "tokenize", "inspect"}


# ---- kill -9 -----------------------------------------------------------------------------------------------------
KILL_JOBS = {
    "convert": lambda m: ["convert", m["native"], "{dst}", "--max-shard-size", "4MB", "--quiet"],
    "bits4": lambda m: ["quantize", m["hf"], "{dst}", "--bits", "4", *G32],
    "bpw3": lambda m: ["quantize", m["hf"], "{dst}", "--bpw", "3.0", "--measure-rows", "2", *G32],
}  # fmt: skip


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(f.name for f in a.iterdir())
    same_names = names == sorted(f.name for f in b.iterdir())
    return same_names and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def kill_phase(dst: Path) -> str:
    """Where a killed run was, from what it left: start-up, measurement, a quantize layer, or the final write."""
    work = dst.parent / ".out.quantkit-work"
    if list(dst.parent.glob(".out.tmp-*")):
        return "final write"
    if dst.exists():
        return "finished"
    for state, what in ((work / "job.json", "layer"), (work / "measure" / "job.json", "measurement layer")):
        if state.is_file():
            return f"{what}s done: {sum(s.startswith('layer.') for s in json.loads(state.read_text())['done'])}"
    return "start-up"


def kill_campaign(job: list, root: Path, kills: int, seed: int) -> dict:
    """Build once uninterrupted (timing the part after start-up), then `kills` times: start, kill -9 at a seeded
    random moment of the work (alternately before and after the layer job starts, so a --bpw run is killed in its
    layers and final write too, not only in its long measurement), rerun to the end, and compare. Returns the
    figures."""
    rng = random.Random(seed)

    def cmd(dst: Path) -> list[str]:
        return [sys.executable, "-m", "quantkit", *(str(a).replace("{dst}", str(dst)) for a in job)]

    def start_and_wait_for_lock(dst: Path) -> tuple[subprocess.Popen, float]:
        p = subprocess.Popen(cmd(dst), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.perf_counter()
        lock = dst.parent / f".{dst.name}.lock"
        while not lock.exists() and p.poll() is None and time.perf_counter() - t0 < 120:
            time.sleep(0.01)
        return p, time.perf_counter()

    ref = root / "ref" / "out"
    ref.parent.mkdir(parents=True)
    p, started = start_and_wait_for_lock(ref)
    layers_s = None  # when the layer-by-layer job starts (after a --bpw measurement): kills alternate either side
    while not ref.exists() and p.poll() is None:  # the work: from taking the lock to DST renamed into place
        if layers_s is None and (ref.parent / ".out.quantkit-work" / "job.json").is_file():
            layers_s = time.perf_counter() - started
        time.sleep(0.005)
    work_s = time.perf_counter() - started
    windows = [(0, layers_s), (layers_s, work_s)] if layers_s else [(0, work_s)]
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()
    figures = {"kills": 0, "identical": 0, "killed_mid_run": 0, "half_written": 0, "stale_bytes": 0}
    for k in range(kills):
        dst = root / f"k{k}" / "out"
        dst.parent.mkdir()
        p, started = start_and_wait_for_lock(dst)
        delay = rng.uniform(*windows[k % len(windows)])
        while p.poll() is None and time.perf_counter() - started < delay:
            time.sleep(0.005)
        if p.poll() is None:
            p.kill()
            figures["killed_mid_run"] += 1
        p.wait()
        figures["kills"] += 1
        phase = kill_phase(dst)
        figures.setdefault("phases", []).append(phase)
        # DST is either absent or complete (an uninterrupted run's bytes): never half-written.
        if dst.exists() and not same_tree(ref, dst):
            figures["half_written"] += 1
        rerun = subprocess.run([*cmd(dst), "--force"], env=ENV, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        figures["identical"] += same_tree(ref, dst)
        kept = dst.parent / ".out.quantkit-work" / "measurement.json"  # kept by design, for --measurement
        if kept.is_file() and len(list(kept.parent.iterdir())) == 1:
            figures["measurement_bytes_kept"] = figures.get("measurement_bytes_kept", 0) + kept.stat().st_size
            kept.unlink()
            kept.parent.rmdir()
        leftovers = [q for q in dst.parent.iterdir() if q.name != "out"]
        figures["stale_bytes"] += sum(f.stat().st_size for q in leftovers for f in [q, *q.rglob("*")] if f.is_file())
        figures.setdefault("stale", []).extend(q.name for q in leftovers)
    return figures


@pytest.mark.parametrize("job", sorted(KILL_JOBS))
def test_kill_9_then_rerun_is_byte_identical(models, tmp_path, job):
    kills = int(os.environ.get("QUANTKIT_KILLS", "2"))
    figures = kill_campaign(
        KILL_JOBS[job](models), tmp_path, kills, seed=int(os.environ.get("QUANTKIT_KILL_SEED", "17"))
    )
    print(f"{job}: {figures}")
    assert figures["identical"] == figures["kills"] == kills
    assert figures["half_written"] == 0 and figures["stale_bytes"] == 0 and not figures.get("stale"), figures
