"""Pixtral image preprocessing and image-token layout, matching mistral-common's ImageEncoder.

transformers' Pixtral processor needs torchvision, which has no CPU build here, so the runtime does it itself:
mistral-common's resize rule (round, not ceil), RGBA onto white, bicubic resize to whole patches, CLIP
normalization. torch's bicubic (a = -0.75, half-pixel centres, no antialias) is the same kernel as the cv2
INTER_CUBIC that mistral-common uses, so pixels agree to ~1e-4 rather than the ~1e-2 a PIL resize would give.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from quantkit.errors import QuantkitError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Which local files load_image may open: ANY_FILE (`quantkit run` / `tokenize`: the user's own files), or, inside
# `with local_media(root)` (the server), only regular files within root (None: no local file at all).
ANY_FILE = object()
_LOCAL_MEDIA: ContextVar[object] = ContextVar("quantkit_local_media", default=ANY_FILE)
LOCAL_MEDIA_REFUSED = ("local image files are not allowed here: send images as data: URIs (a server reads only files "
                       "inside its --allowed-local-media-path folder)")  # fmt: skip


@contextmanager
def local_media(root: Path | None) -> Iterator[None]:
    """Within the block, load_image opens a local path (plain, file:// or relative to root) only when it resolves,
    symlinks followed, to a regular file inside root; root None: no local path at all. Every refused path gets
    the same error, whether it exists or not, so a client cannot probe which files the server has."""
    token = _LOCAL_MEDIA.set(None if root is None else Path(root).resolve())
    try:
        yield
    finally:
        _LOCAL_MEDIA.reset(token)


def _open_allowed(url: str, root: Path | None) -> Image.Image:
    """Open url if local_media(root) lets it be read, else the one refusal. The resolved path is opened without
    following a symlink, so a file swapped for one after the check is refused too."""
    if root is not None:
        try:
            path = (root / (unquote(urlparse(url).path) if url.startswith("file://") else url)).resolve(strict=True)
            if path.is_relative_to(root):
                with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
                    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        return _open(f, str(path))
        except (OSError, ValueError, RuntimeError):  # missing, unreadable, a symlink loop, a NUL byte
            pass
    raise QuantkitError(LOCAL_MEDIA_REFUSED)


def load_image(url: str, base_dir: Path | None = None) -> Image.Image:
    """Open an image given as a local path (relative to base_dir), a file:// URI or a data: URI (local paths only as
    local_media allows, when it is in force)."""
    if not isinstance(url, str) or not url:
        raise QuantkitError("image_url must be a non-empty string")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise QuantkitError("data: image URIs must be base64-encoded")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise QuantkitError("data: image URI has an invalid base64 payload") from None
        return _open(io.BytesIO(raw), "data: URI")
    if url.startswith(("http://", "https://")):
        raise QuantkitError(f"remote image URLs are not supported, download the file first: {url[:80]}")
    root = _LOCAL_MEDIA.get()
    if root is not ANY_FILE:
        return _open_allowed(url, root)
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise QuantkitError(f"image file not found: {path}")
    return _open(path, str(path))


def _open(source, label: str, max_size: int = 1024) -> Image.Image:
    """Decode under a pixel budget: a JPEG is decoded at a reduced scale (draft mode) when it is much larger than
    the encoder can use; PIL's multi-line DecompressionBombWarning is silenced (its hard limit still refuses)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            size = image.size
            if image.format == "JPEG" and max(size) > 4 * max_size:
                scale = 2 * max_size / max(size)  # keep twice the final resolution for the bicubic resize
                image.draft("RGB", (max(1, int(size[0] * scale)), max(1, int(size[1] * scale))))
            image.load()
            image.info["original_size"] = size  # the token grid follows the image as sent, not as decoded
    except Image.DecompressionBombError:
        raise QuantkitError(f"{label}: image has too many pixels to open safely") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QuantkitError(f"{label}: not a readable image ({type(e).__name__})") from None
    return image


def image_grid(width: int, height: int, patch_size: int = 16, max_size: int = 1024) -> tuple[int, int]:
    """(columns, rows) of image tokens: scale the longest edge down to max_size (rounding), then whole patches."""
    ratio = max(width, height) / max_size
    if ratio > 1:
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    return (width - 1) // patch_size + 1, (height - 1) // patch_size + 1


def image_token_ids(columns: int, rows: int, img_id: int, break_id: int, end_id: int) -> list[int]:
    """Each row is `columns` x [IMG] then [IMG_BREAK]; the very last token is [IMG_END] instead."""
    ids = ([img_id] * columns + [break_id]) * rows
    ids[-1] = end_id
    return ids


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparent areas composited onto white (what mistral-common does)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, "WHITE")
    background.paste(rgba, (0, 0), rgba)
    return background.convert("RGB")


def preprocess_image(image: Image.Image, patch_size: int = 16, max_size: int = 1024) -> torch.Tensor:
    """[3, H, W] float32, normalized, with H and W whole multiples of patch_size.

    A much larger image is first box-reduced (in uint8) to about twice the output size, so a 10000x10000 image
    never becomes a 1.2 GB float32 array."""
    columns, rows = image_grid(*image.info.get("original_size", image.size), patch_size, max_size)
    size = (rows * patch_size, columns * patch_size)
    k = min(image.width // (2 * size[1]), image.height // (2 * size[0]))
    if k >= 2:
        image = image.reduce(k)
    pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32).copy()).permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (resized / 255.0 - mean) / std
