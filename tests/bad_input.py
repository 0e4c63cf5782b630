"""The bad-input table: each case a clear 4xx, nothing stored. Used through the API
(tests/test_service.py) and through the web form (tests/test_browser.py)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from tests.jpeg_bomb import progressive_bomb


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG header declaring enormous dimensions, with no pixel data worth decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + iend


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
ANIMATED = encoded(NOISE, "WEBP", save_all=True, append_images=[NOISE.rotate(90)], duration=100)

#: Cases the page cannot send as a user would: choosing the file makes the browser decode it
#: for the thumbnail, seconds of the page's own CPU for a decode bomb. The API takes them.
NOT_THROUGH_THE_FORM = frozenset({"JPEG of 5,000 scans", "style JPEG of 5,000 scans"})

# (case, content bytes or a marker, fields, expected status, error code, error field);
# fields["style"]: the style's bytes, None for no style, absent for the painting.
BAD_INPUT: list[tuple[str, Any, dict[str, Any], int, str, str]] = [
    ("not an image", b"just some text", {}, 415, "unsupported_image_format", "content"),
    ("truncated", encoded(NOISE, "PNG")[:300], {}, 422, "invalid_image", "content"),
    ("zero-size file", b"", {}, 422, "invalid_image", "content"),
    ("pixel bomb", encoded(Image.new("L", (8000, 6000)), "PNG"), {}, 413, "image_too_large",
     "content"),
    ("enormous dimensions", png_with_size(100_000, 100_000), {}, 413, "image_too_large",
     "content"),
    # 249 KB, seconds of CPU per decode without the scan limit (shared/images.py).
    ("JPEG of 5,000 scans", progressive_bomb(4000, 5000), {}, 422, "invalid_image", "content"),
    ("style JPEG of 5,000 scans", "photo", {"style": progressive_bomb(4000, 5000)}, 422,
     "invalid_image", "style"),
    ("over the byte limit", "huge", {}, 413, "image_too_large", "content"),
    ("GIF", encoded(NOISE, "GIF"), {}, 415, "unsupported_image_format", "content"),
    ("TIFF", encoded(NOISE, "TIFF"), {}, 415, "unsupported_image_format", "content"),
    ("animated WebP", ANIMATED, {}, 415, "unsupported_image_format", "content"),
    ("strip content", png_with_size(20000, 1), {}, 413, "image_too_large", "content"),
    ("strip style", "photo", {"style": png_with_size(20000, 1)}, 413, "image_too_large",
     "style"),
    ("style over the pixel limit", "photo", {"style": png_with_size(100_000, 100_000)}, 413,
     "image_too_large", "style"),
    ("no content", None, {}, 422, "invalid_option", "content"),
    ("no style", "photo", {"style": None}, 422, "invalid_option", "style"),
    ("unknown field", "photo", {"colour": "blue"}, 422, "invalid_option", "colour"),
    ("size too small", "photo", {"size": "5"}, 422, "invalid_option", "size"),
    ("size huge", "photo", {"size": "100000"}, 422, "invalid_option", "size"),
    ("iterations not a number", "photo", {"iterations": "lots"}, 422, "invalid_option",
     "iterations"),
    ("iterations over the limit", "photo", {"iterations": "1000000000"}, 422, "invalid_option",
     "iterations"),
    ("NaN weight", "photo", {"content_weight": "nan"}, 422, "invalid_option", "content_weight"),
    ("infinite weight", "photo", {"tv_weight": "inf"}, 422, "invalid_option", "tv_weight"),
    ("negative weight", "photo", {"style_weight": "-1"}, 422, "invalid_option", "style_weight"),
    ("huge weight", "photo", {"style_weight": "1e300"}, 422, "invalid_option", "style_weight"),
    ("strength over 1", "photo", {"style_strength": "1.5"}, 422, "invalid_option",
     "style_strength"),
    ("strength not a number", "photo", {"style_strength": "strong"}, 422, "invalid_option",
     "style_strength"),
    ("unknown optimizer", "photo", {"optimizer": "sgd"}, 422, "invalid_option", "optimizer"),
    ("unknown layer", "photo", {"style_layers": "relu9_1"}, 422, "invalid_option",
     "style_layers"),
    ("duplicate layers", "photo", {"style_layers": "relu1_1,relu2_1,relu1_1"}, 422,
     "invalid_option", "style_layers"),
    ("unknown preset", "photo", {"style_preset": "mona-lisa"}, 422, "invalid_option",
     "style_preset"),
    ("too many styles", "photo", {"style_preset": ["starry-night"] * 8}, 422, "invalid_option",
     "style"),
    ("weights not matching styles", "photo", {"style_weights": "1,2,3"}, 422, "invalid_option",
     "style_weights"),
    ("unknown backbone", "photo", {"backbone": "resnet"}, 422, "invalid_option", "backbone"),
    ("pyramid too deep for the image", "photo", {"scales": "3"}, 422, "invalid_option",
     "scales"),
    ("weights missing on every worker", "photo", {"backbone": "vgg19"}, 422, "invalid_option",
     "backbone"),
    ("callback to a host off the allow-list", "photo", {"callback_url": "http://evil.example/"},
     422, "invalid_option", "callback_url"),
    ("unknown mode", "photo", {"mode": "slow"}, 422, "invalid_option", "mode"),
    ("a fast job past the network's size", "photo", {"mode": "fast", "size": "1500"}, 422,
     "invalid_option", "size"),
    ("unknown start", "photo", {"init": "faster"}, 422, "invalid_option", "init"),
    ("reuse not a boolean", "photo", {"reuse": "maybe"}, 422, "invalid_option", "reuse"),
]  # fmt: skip
