"""Shared fixtures: tiny random models of the four architectures in Mistral-native and converted HF layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors; this must be set before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


class TinyModels:
    """Builds each tiny model once per test session: reference (transformers), native folder, converted folder."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, dict] = {}

    def get(self, name: str) -> dict:
        if name not in self._cache:
            from native_models import build_reference, write_native

            from quantkit.convert.pipeline import convert

            ref = build_reference(name)
            native_dir, hf_dir = self.root / f"{name}-native", self.root / f"{name}-hf"
            native, hf = write_native(name, ref, native_dir)
            convert(native_dir, hf_dir, progress=False)
            self._cache[name] = dict(reference=ref, native=native_dir, hf=hf_dir, native_tensors=native, hf_tensors=hf)
        return self._cache[name]


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: thread hand-offs cost more than they save on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scene_image(tmp_path_factory) -> Path:
    """A 70x40 random-pixel PNG for `quantkit run --image` tests."""
    from PIL import Image

    path = tmp_path_factory.mktemp("images") / "scene.png"
    pixels = torch.randint(0, 256, (40, 70, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """tiny_models.get(name) -> {reference, native, hf, native_tensors, hf_tensors}; names in native_models.MODELS."""
    return TinyModels(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def fresh_bpw_build():
    """fresh_bpw_build(src, root, args): a `quantize --bpw 3.0` of src into root/fresh3; returns its
    measurement.json, kept (copied beside it) so other targets reuse it with --measurement instead of measuring."""
    return _fresh_bpw_build


def _fresh_bpw_build(src: Path, root: Path, args: list[str]) -> Path:
    import shutil

    from click.testing import CliRunner

    from quantkit.cli import main

    args = ["quantize", str(src), str(root / "fresh3"), "--bpw", "3.0", *map(str, args)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    measurement = root / "measurement.json"
    shutil.copy(root / ".fresh3.quantkit-work" / "measurement.json", measurement)
    return measurement
