"""Our image preprocessing against mistral-common's ImageEncoder (resize rule, RGBA on white, normalization,
token layout), image loading, and that the runtime path imports neither mistral-common, transformers nor
torchvision."""

from __future__ import annotations

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs, transform_image
from PIL import Image
from tokenizer_cases import data_uri, image_file

from quantkit.errors import QuantkitError
from quantkit.tokenizer.image import image_grid, image_token_ids, load_image, preprocess_image

SIZES = [(1, 1), (16, 16), (17, 33), (37, 53), (640, 481), (1024, 1024), (1025, 1025), (1500, 703), (333, 2049),
         (5000, 3), (2, 3000)]  # fmt: skip


def _encoder(max_size: int = 1024) -> ImageEncoder:
    return ImageEncoder(ImageConfig(image_patch_size=16, max_image_size=max_size), SpecialImageIDs(10, 14, 15))


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_grid_and_tokens_match_mistral_common(width, height):
    encoder = _encoder()
    columns, rows = image_grid(width, height)
    assert (columns, rows) == encoder._image_to_num_tokens(Image.new("RGB", (width, height)))
    assert image_token_ids(columns, rows, 10, 14, 15) == encoder(_chunk(Image.new("RGB", (width, height)))).tokens


def _chunk(image: Image.Image):
    from mistral_common.protocol.instruct.chunk import ImageChunk

    return ImageChunk(image=image)


@pytest.mark.parametrize(
    ("width", "height", "mode", "fmt"),
    [(37, 53, "RGB", "PNG"), (640, 481, "RGBA", "PNG"), (1500, 703, "RGB", "JPEG"), (333, 2049, "L", "PNG"),
     (250, 120, "P", "PNG"), (1025, 1025, "RGBA", "PNG")],
)  # fmt: skip
def test_pixels_match_mistral_common(width, height, mode, fmt):
    image = Image.open(image_file(width, height, mode, fmt))
    expected = _encoder()(_chunk(image)).image
    ours = preprocess_image(image)
    assert tuple(ours.shape) == expected.shape and ours.shape[1] % 16 == 0 and ours.shape[2] % 16 == 0
    assert np.abs(ours.numpy() - expected).mean() < 1e-2


def test_max_size_and_patch_size_are_honoured():
    image = Image.open(image_file(640, 481))
    expected = transform_image(image, (512, 400))  # 640x481 scaled to longest edge 512 -> 512x385 -> whole patches
    ours = preprocess_image(image, patch_size=16, max_size=512)
    assert tuple(ours.shape) == expected.shape == (3, 400, 512)
    assert np.abs(ours.numpy() - expected).mean() < 1e-2
    assert tuple(preprocess_image(image, patch_size=28, max_size=1024).shape) == (3, 504, 644)


def test_transparent_pixels_become_white():
    clear = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    expected = _encoder()(_chunk(white)).image
    assert np.abs(preprocess_image(clear).numpy() - expected).max() < 1e-5


def test_load_image_sources(tmp_path):
    path = image_file(37, 53)
    spaced = tmp_path / "with space %.png"
    spaced.write_bytes(path.read_bytes())
    reference = np.asarray(Image.open(path))
    for source, base in [(str(path), None), (path.name, path.parent), (spaced.as_uri(), None), (data_uri(path), None)]:
        assert np.array_equal(np.asarray(load_image(source, base)), reference)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/cat.png", "remote image URLs are not supported"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64,aGVsbG8=", "not a readable image"),
        ("/definitely/not/here.png", "image file not found"),
        ("", "non-empty string"),
    ],
)
def test_load_image_errors(url, message):
    with pytest.raises(QuantkitError, match=message):
        load_image(url)


def test_runtime_path_imports_no_reference_libraries():
    """mistral-common and transformers are test dependencies; torchvision has no CPU build here."""
    import ast
    from pathlib import Path

    import quantkit.tokenizer

    forbidden = {"mistral_common", "transformers", "torchvision", "cv2", "tiktoken"}
    for path in Path(quantkit.tokenizer.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & forbidden, (path.name, names)
