"""A full disk: refused up front with the numbers, and a write that still fails (ENOSPC) is one line, nothing partial.

Runs on a small tmpfs mounted for the test (skipped where mounting is not allowed, e.g. without root)."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest
from click.testing import CliRunner

from quantkit.cli import main

FAST = ["--rows", "4", "--seq-len", "64", "--group-size", "32", "--quiet"]


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size) -> a folder on its own tmpfs of that size (4m, 64k)."""

    def mount(size: str):
        mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(mnt)
        return mnt

    mounted = []
    yield mount
    for m in mounted:
        subprocess.run(["umount", str(m)], check=False)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_convert_refused_before_writing_when_the_output_does_not_fit(tiny_models, small_fs):
    fs = small_fs("4m")
    line = one_line(run("convert", tiny_models.get("mistral_large")["native"], fs / "out", "--quiet"), "free space")
    from quantkit.convert.pipeline import convert

    planned = convert(tiny_models.get("mistral_large")["native"], fs / "x", dry_run=True).total_bytes
    need, free = (float(x) for x in re.search(r"needs ([\d.]+) MB, ([\d.]+) MB free", line).groups())
    assert need == round(planned / 1e6, 2) and free < need <= 17.1  # the planned output, and the free space
    assert list(fs.iterdir()) == []


def test_convert_enospc_while_writing_is_one_line_and_leaves_nothing(tiny_models, small_fs, monkeypatch):
    fs = small_fs("4m")
    monkeypatch.setattr("quantkit.io.writer.check_space", lambda needs: None)  # as if the disk filled up later
    line = one_line(run("convert", tiny_models.get("mistral_large")["native"], fs / "out", "--quiet"),
                    "No space left on device", "the run needs about", "nothing was written")  # fmt: skip
    assert str(fs) in line
    assert list(fs.iterdir()) == []


def test_quantize_refused_up_front_counting_the_work_dir(tiny_models, small_fs):
    fs = small_fs("24m")  # room for the 17 MB output alone, not for it and the job's layers and row stores
    src = tiny_models.get("mistral_large")["hf"]
    one_line(run("quantize", src, fs / "out", *FAST), "not enough free space", "free")
    assert list(fs.iterdir()) == []


def test_quantize_enospc_in_the_work_dir_is_one_line_and_no_output(tiny_models, small_fs, tmp_path, monkeypatch):
    fs = small_fs("64k")
    monkeypatch.setattr("quantkit.quant.pipeline.check_space", lambda needs: None)
    src, dst = tiny_models.get("mistral_large")["hf"], tmp_path / "out"
    line = one_line(run("quantize", src, dst, "--work-dir", fs / "work", *FAST), "No space left on device")
    assert str(fs / "work") in line and "was not written" in line
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_convert_enospc_copying_a_file_names_the_dst_file_and_dst_free_space(tiny_models, small_fs, monkeypatch):
    """A copy's OSError names the source first (shutil.copyfile: filename=src, filename2=dst): the message must
    name the file being written at DST and quote DST's free space, not the source's."""
    import shutil

    fs = small_fs("64k")  # room for config.json and the like, not for the tokenizer file copied from SRC
    src = tiny_models.get("mistral_large")["native"]
    monkeypatch.setattr("quantkit.io.writer.check_space", lambda needs: None)  # as if the disk filled up later
    monkeypatch.setattr("quantkit.convert.pipeline.write_sharded", lambda *a, **kw: None)  # the shards take no room
    monkeypatch.setattr("quantkit.convert.pipeline.write_tokenizer_files",  # its last step: copy the tokenizer file
                        lambda info, out, vision: shutil.copyfile(info.path, out / info.path.name))  # fmt: skip
    line = one_line(run("convert", src, fs / "out", "--quiet"), "No space left on device", "nothing was written")
    written = re.search(r"failed writing (\S+): ", line).group(1)
    assert written.startswith(f"{fs}/.out.tmp-") and written.endswith("/tokenizer.model.v3") and str(src) not in line
    number, unit = re.search(r"; ([\d.]+) (B|KB|MB|GB|TB) free now\)", line).groups()
    free = float(number) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(unit)
    assert free <= 64 * 1024 < shutil.disk_usage(src).free  # DST's small file system, not the source's
    assert list(fs.iterdir()) == []
