"""Never lose data: --force over a folder holding SRC, locks per DST and work dir, dead runs' leftovers, job cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.errors import QuantkitError
from quantkit.io.claim import Claim, Lock, identity
from quantkit.quant.job import Job

FAST = ["--rows", "4", "--seq-len", "64", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("target", ["parent", "grandparent", "link-to-parent", "link-to-grandparent"])
def test_force_never_removes_a_folder_holding_the_source(tiny_models, tmp_path, command, target):
    model = tiny_models.get("mistral_large")
    src = tmp_path / "a" / "b" / "src"
    shutil.copytree(model["native" if command == "convert" else "hf"], src)
    before = tree_hash(tmp_path / "a")
    folder = {"parent": src.parent, "grandparent": src.parent.parent}[target.removeprefix("link-to-")]
    dst = folder
    if target.startswith("link"):
        dst = tmp_path / "link"
        dst.symlink_to(folder, target_is_directory=True)
    extra = ["--group-size", "32", *FAST] if command == "quantize" else ["--quiet"]
    one_line_error(run(command, src, dst, "--force", *extra), "contains the source folder")
    assert tree_hash(tmp_path / "a") == before


def test_force_never_removes_a_folder_that_is_not_a_previous_output(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["hf"]
    dst = tmp_path / "home"
    (dst / "photos").mkdir(parents=True)
    (dst / "config.json").write_text("{}")
    (dst / "model.safetensors").write_bytes(b"")
    one_line_error(run("quantize", src, dst, "--force", "--group-size", "32", *FAST), "previous model output")
    assert (dst / "photos").is_dir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.json").write_text("{}")
    g32 = ["--group-size", "32", *FAST]
    one_line_error(run("quantize", src, tmp_path, "--force", "--work-dir", work, *g32), "contains the work dir")
    one_line_error(run("quantize", src, tmp_path / "o", "--work-dir", tmp_path / "o" / "w", *g32), "contains the work")
    assert (work / "job.json").read_text() == "{}" and (dst / "photos").is_dir()


def test_lock_is_exclusive_names_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from quantkit.io.claim import Lock; "
         "Lock(sys.argv[1], 'x').acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path / "l.lock")],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(QuantkitError, match=f"x is in use by another quantkit run \\(pid {holder.pid}\\)"):
            Lock(tmp_path / "l.lock", "x").acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = Lock(tmp_path / "l.lock", "x")  # the kernel dropped the dead holder's flock; its file names it
    assert lock.acquire().startswith(f"{holder.pid}-")
    assert (tmp_path / "l.lock").read_text() == identity()
    lock.release()
    assert not (tmp_path / "l.lock").exists()


def test_dead_holder_is_reported_and_leftovers_removed_with_the_bytes_freed(tiny_models, tmp_path):
    src = tiny_models.get("mistral_large")["native"]
    dst = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("999999999-1")  # a lock file whose process is gone
    stale = tmp_path / ".out.tmp-999999999-1"  # a killed convert's temporary folder
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1_500_000)
    live = tmp_path / f".out.tmp-{identity()}-x"  # a live process's folder is left alone
    live.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "quantkit", "convert", str(src), str(dst), "--quiet"], env=ENV, capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "from process 999999999, which is gone" in result.stderr
    assert "removed 1 temporary folder(s) left by interrupted runs" in result.stderr
    assert "(1.50 MB freed)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_claim_refuses_a_second_run_into_the_same_dst_or_work_dir(tmp_path):
    with Claim(tmp_path / "out", tmp_path / "work"):
        with pytest.raises(QuantkitError, match="output folder .*out is in use"):
            Claim(tmp_path / "out").__enter__()
        with pytest.raises(QuantkitError, match="work dir .*work is in use"):
            Claim(tmp_path / "other", tmp_path / "work").__enter__()
        assert not (tmp_path / ".other.lock").exists()  # a refused claim releases what it took
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_job_state_is_final_before_cleanup_and_a_killed_cleanup_is_recovered(tmp_path):
    import torch

    work = tmp_path / "w"
    job = Job(work, {"a": 1})
    job.finish(0)
    job.finish(1, {"x": torch.ones(2)}, {})
    (work / "mine.txt").write_text("not the job's")  # a --work-dir that also holds the user's files
    job.cleanup()
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]

    job = Job(tmp_path / "w2", {"a": 1})
    job.finish(0)
    job.finish(1, {"x": torch.ones(2)}, {})
    (job.dir / "job.json").unlink()  # a kill right after cleanup's first step: the job is over, files remain
    from quantkit.quant.job import remove_stale

    said = []
    assert remove_stale(job.dir, said.append) > 0 and not job.dir.exists()
    assert "leftover file(s)" in said[0]


@pytest.mark.reliability
def test_concurrent_quantize_one_refused_other_byte_identical(tiny_models, tmp_path):
    """Issue 19's scenario: a second `quantize --bits 4` into the same DST 3 s after the first."""
    src = tiny_models.get("mistral_large")["hf"]
    args = ["--bits", "4", "--group-size", "32", "--rows", "8", "--seq-len", "256", "--quiet"]
    solo, dst = tmp_path / "solo" / "out", tmp_path / "both" / "out"
    solo.parent.mkdir()
    dst.parent.mkdir()
    cmd = [sys.executable, "-m", "quantkit", "quantize", str(src)]
    subprocess.run([*cmd, str(solo), *args], env=ENV, check=True, capture_output=True)
    first = subprocess.Popen([*cmd, str(dst), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    t0 = time.perf_counter()
    second = subprocess.run([*cmd, str(dst), *args], env=ENV, capture_output=True, text=True, timeout=120)
    refused_in = time.perf_counter() - t0
    still_running = first.poll() is None
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert still_running, "the first run ended before the second tried: the scenario was not exercised"
    assert second.returncode == 1 and second.stderr.strip().count("\n") == 0, second.stderr
    assert f"is in use by another quantkit run (pid {first.pid})" in second.stderr
    assert refused_in < 60
    for f in sorted(solo.iterdir()):
        assert f.read_bytes() == (dst / f.name).read_bytes(), f.name
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out"]  # no lock, temp folder or work dir left


def test_quantize_job_json_written_atomically_with_a_private_tmp_name(tmp_path):
    job = Job(tmp_path / "w", {"a": 1})
    job.finish(0)
    assert json.loads((tmp_path / "w" / "job.json").read_text())["done"] == 0
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["job.json", "layers"]


def _index_to(folder: Path, shard_name: str) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "consolidated.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"weight_map": dict.fromkeys(names, shard_name)}
    (folder / "consolidated.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("../outside.safetensors", "outside the checkpoint folder"),
        ("/tmp/x.safetensors", "outside the checkpoint folder"),
        ("escape/consolidated.safetensors", "outside the checkpoint folder"),  # a symlinked folder leading out
        ("consolidated.bin", "pickle files are not loaded"),
        ("weights.pt", "pickle files are not loaded"),
    ],
)
def test_index_shards_must_be_safetensors_inside_the_folder(tiny_models, tmp_path, name, needle):
    src = tmp_path / "src"
    shutil.copytree(tiny_models.get("mistral_large")["native"], src)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(src / "consolidated.safetensors", outside / "consolidated.safetensors")
    shutil.copy(src / "consolidated.safetensors", tmp_path / "outside.safetensors")
    (src / "escape").symlink_to(outside, target_is_directory=True)
    _index_to(src, name)
    before = tree_hash(src)
    dst = tmp_path / "out"
    one_line_error(run("convert", src, dst, "--quiet"), needle)
    assert not dst.exists() and tree_hash(src) == before


def test_symlinked_shard_inside_the_folder_is_fine(tiny_models, tmp_path):
    """The Hugging Face cache layout: snapshots/REV/file -> ../../blobs/HASH."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    shutil.copytree(tiny_models.get("mistral_large")["native"], snap)
    os.replace(snap / "consolidated.safetensors", blobs / "abc123")
    (snap / "consolidated.safetensors").symlink_to(Path("../../blobs/abc123"))
    _index_to(snap, "consolidated.safetensors")
    assert run("convert", snap, tmp_path / "out", "--quiet").exit_code == 0
