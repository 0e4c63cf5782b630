"""Decoding user images into plain 8-bit RGB, with the limits checked before decoding.

Accepted: JPEG, PNG and WebP. EXIF orientation is applied. Modes L, LA, P, RGBA, CMYK and
16-bit greyscale (``I;16``/``I``) become RGB; transparency is composited onto white, which
is what a viewer shows for a transparent area on a white page.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageError, ImageTooLarge, UnsupportedImageFormat

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
ImageSource = str | os.PathLike[str] | bytes | BinaryIO


def _read_bytes(source: ImageSource, max_bytes: int, name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such file: {path}", field=name)
        if path.stat().st_size > max_bytes:
            raise ImageTooLarge(
                f"{path} is {path.stat().st_size:,} bytes; the limit is {max_bytes:,}", field=name
            )
        data = path.read_bytes()
    else:
        # Read one byte past the limit so an oversized stream is detected without reading it all.
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the file is over the limit of {max_bytes:,} bytes", field=name)
    if not data:
        raise ImageError("the file is empty", field=name)
    return data


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them.
    values = np.asarray(image, dtype=np.int64)
    eight_bit = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: alpha over white, palettes expanded, 16-bit scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "RGBA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(
    source: ImageSource,
    *,
    max_bytes: int,
    max_pixels: int,
    name: str = "image",
) -> Image.Image:
    """Decode ``source`` (a path, bytes or a binary file) into an RGB image.

    Raises :class:`ImageTooLarge` for a file over ``max_bytes`` or an image over
    ``max_pixels`` (checked from the header, before any pixel is decoded),
    :class:`UnsupportedImageFormat` for anything but JPEG/PNG/WebP, and :class:`ImageError`
    for a file that cannot be decoded. ``name`` is the field named in the error.
    """
    data = _read_bytes(source, max_bytes, name)
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's decompression-bomb warning would only
            # duplicate it (and pytest turns warnings into errors).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedImageFormat(
            "not an image Pillow can read; use JPEG, PNG or WebP", field=name
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), field=name) from exc
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImageFormat(
            f"{image.format} images are not accepted; use JPEG, PNG or WebP", field=name
        )
    if getattr(image, "is_animated", False):
        raise UnsupportedImageFormat(
            f"animated {image.format} images are not accepted; send a single frame", field=name
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}×{height} is {width * height:,} pixels; the limit is {max_pixels:,}",
            field=name,
        )
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels", field=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated or corrupt data as OSError/ValueError/SyntaxError.
        raise ImageError(f"the {image.format} data is corrupt: {exc}", field=name) from exc
    return to_rgb(image)


def encode_png(image: Image.Image, *, compress_level: int = 6) -> bytes:
    """``image`` as PNG bytes; ``compress_level`` is zlib's, from 0 (none) to 9 (smallest)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
