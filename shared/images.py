"""Decoding user images into plain 8-bit RGB, with the limits checked before decoding.

Accepted: JPEG, PNG and WebP. EXIF orientation is applied. Modes L, LA, P, RGBA, CMYK and
16-bit greyscale (``I;16``/``I``) become RGB; transparency is composited onto white, which
is what a viewer shows for a transparent area on a white page.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from shared.errors import ImageError, ImageTooLarge, UnsupportedImageFormat

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
#: Formats people send that are refused, named from their first bytes in the refusal (their
#: parsers never run: Image.open is given ACCEPTED_FORMATS alone).
_OTHER_FORMATS = (
    (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"8BPS", "PSD"),
)  # fmt: skip
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
    # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them. Scaled in
    # Pillow's own 32-bit mode (4 bytes a pixel), never through wider numpy copies; values
    # outside 0..65535 (mode "I") clip when converted to 8 bits.
    return image.convert("I").point(lambda value: value / 256).convert("L").convert("RGB")


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
        # Pasted through its own alpha onto white: one RGB canvas, no float or RGBA copies.
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


#: The most scans a JPEG may have. libjpeg decodes each scan of a progressive JPEG over the
#: whole image and sets no limit of its own, so a small file of thousands of tiny scans costs
#: minutes of CPU per decode. Encoders write about ten (libjpeg's progressive script: 10 for
#: colour), and an EXIF thumbnail's are not counted.
MAX_JPEG_SCANS = 32
_RESTART_MARKERS = range(0xD0, 0xD8)


def jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS markers) of the JPEG ``data``, read from its markers and
    nothing decoded; counting stops past ``stop_after``. Each segment's length skips its
    contents (an EXIF thumbnail's markers are inside one), and the entropy-coded data after
    a scan's header is skipped to the next marker: a 0xFF there is followed by 0x00
    (stuffing) or a restart marker."""
    count, at, end = 0, 2, len(data)
    while at + 4 <= end and count <= stop_after:
        if data[at] != 0xFF:
            return count  # not a marker: corrupt, which the decoder reports
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        if marker == 0xD9:  # end of image
            return count
        if marker in _RESTART_MARKERS or marker in (0x01, 0xD8):  # no length field
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if marker != 0xDA:
            continue
        count += 1
        while True:  # the scan's entropy-coded data, to the next real marker
            found = data.find(b"\xff", at)
            if found < 0 or found + 1 >= end:
                return count
            following = data[found + 1]
            if following == 0x00 or following in _RESTART_MARKERS:
                at = found + 2
            elif following == 0xFF:
                at = found + 1
            else:
                at = found
                break
    return count


#: Longest side over shortest side an image may have (content and styles): a style is
#: resized to the output's scale from its aspect, so a 20000×1 strip would become a huge
#: tensor however small its file.
MAX_ASPECT_RATIO = 10.0
#: EXIF orientations that turn the image a quarter: its upright width is its stored height.
_QUARTER_TURNS = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: the upright size (EXIF orientation applied) and the format."""

    width: int
    height: int
    format: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def _open_checked(data: bytes, *, max_pixels: int, max_aspect: float, name: str) -> Image.Image:
    """``data`` opened lazily (no pixel decoded) after the header's checks."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's decompression-bomb warning would only
            # duplicate it (and pytest turns warnings into errors).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only our formats' parsers ever run on an upload.
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        known = next((fmt for magic, fmt in _OTHER_FORMATS if data.startswith(magic)), None)
        if known is not None:
            raise UnsupportedImageFormat(
                f"{known} images are not accepted; use JPEG, PNG or WebP", field=name
            ) from exc
        raise UnsupportedImageFormat(
            "not a JPEG, PNG or WebP image; use one of those", field=name
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc), field=name) from exc
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedImageFormat(
            f"{image.format} images are not accepted; use JPEG, PNG or WebP", field=name
        )
    if image.format == "JPEG" and jpeg_scans(data) > MAX_JPEG_SCANS:
        raise ImageError(
            f"the JPEG has more than {MAX_JPEG_SCANS} scans, and each one costs a decode of the "
            "whole image; save it again as a baseline or standard progressive JPEG",
            field=name,
        )
    if getattr(image, "is_animated", False):
        raise UnsupportedImageFormat(
            f"animated {image.format} images are not accepted; send a single frame", field=name
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels", field=name)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}×{height} is {width * height:,} pixels; the limit is {max_pixels:,}",
            field=name,
        )
    if max(width, height) > max_aspect * min(width, height):
        raise ImageTooLarge(
            f"{width}×{height} is more than {max_aspect:g} times as long as it is wide; crop it",
            field=name,
        )
    return image


def _load(image: Image.Image, name: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        # Pillow reports truncated or corrupt data as OSError/ValueError/SyntaxError, and
        # a chunk cut short as struct.error.
        raise ImageError(f"the {image.format} data is corrupt: {exc}", field=name) from exc


def probe_image(
    source: ImageSource,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect: float = MAX_ASPECT_RATIO,
    name: str = "image",
    decode_slots: AbstractContextManager[Any] | None = None,
) -> tuple[bytes, ImageInfo]:
    """Check ``source`` as :func:`decode_image` does, keeping none of its pixels: the bytes
    and what the header says.

    The header is checked first (format, pixels, aspect); then the image is decoded once,
    to refuse corrupt data now rather than in a worker, and dropped. ``decode_slots`` (a
    semaphore) bounds how many such decodes a process runs at once: each holds up to
    ``max_pixels`` × 4 bytes while it lasts.
    """
    data = _read_bytes(source, max_bytes, name)
    image = _open_checked(data, max_pixels=max_pixels, max_aspect=max_aspect, name=name)
    with decode_slots if decode_slots is not None else nullcontext():
        # Loaded before its EXIF is read: a PNG's EXIF may follow its pixels.
        _load(image, name)
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:
            width, height = height, width
        image.close()
    return data, ImageInfo(width=width, height=height, format=str(image.format))


def decode_image(
    source: ImageSource,
    *,
    max_bytes: int,
    max_pixels: int,
    max_aspect: float = MAX_ASPECT_RATIO,
    name: str = "image",
) -> Image.Image:
    """Decode ``source`` (a path, bytes or a binary file) into an upright RGB image.

    Raises :class:`ImageTooLarge` for a file over ``max_bytes``, an image over
    ``max_pixels`` or longer than ``max_aspect`` times its width (checked from the header,
    before any pixel is decoded), :class:`UnsupportedImageFormat` for anything but
    JPEG/PNG/WebP, and :class:`ImageError` for a file that cannot be decoded. ``name`` is
    the field named in the error.
    """
    data = _read_bytes(source, max_bytes, name)
    image = _open_checked(data, max_pixels=max_pixels, max_aspect=max_aspect, name=name)
    _load(image, name)
    try:
        return upright_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the {image.format} data is corrupt: {exc}", field=name) from exc


def upright_rgb(image: Image.Image) -> Image.Image:
    """A loaded image turned upright by its EXIF orientation, as 8-bit RGB."""
    return to_rgb(ImageOps.exif_transpose(image))


#: zlib's level for previews, which the next one replaces: the fastest level, for files a
#: little larger than at PNG's default (6); a preview lives briefly, so encoding time
#: matters more than its size. The result keeps the default.
PREVIEW_COMPRESS_LEVEL = 1


def synthetic_pair(
    content_size: tuple[int, int], style_size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """A made-up photo (a grey gradient) and painting (noise) of these (width, height), for
    the speed runs a worker makes before its first job."""
    content = Image.linear_gradient("L").convert("RGB").resize(content_size)
    style = Image.effect_noise(style_size, 64).convert("RGB")
    return content, style


def encode_png(image: Image.Image, *, compress_level: int = 6) -> bytes:
    """``image`` as PNG bytes; ``compress_level`` is zlib's, from 0 (none) to 9 (smallest)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
