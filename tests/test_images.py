"""Decoding user images (formats, modes, orientation and every rejection) and encoding ours."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import ImageError, ImageTooLarge, UnsupportedImageFormat
from shared.images import MAX_JPEG_SCANS, decode_image, encode_png, jpeg_scans, probe_image
from tests.jpeg_bomb import progressive_bomb

LIMITS = {"max_bytes": 5 * 1024 * 1024, "max_pixels": 4_000_000}


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
NOISE_PNG = encoded(NOISE, "PNG")
NOISE_JPEG = encoded(NOISE, "JPEG")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    source = Image.new("RGB", (40, 30), (200, 40, 10))
    image = decode_image(encoded(source, fmt), **LIMITS)
    assert image.mode == "RGB"
    assert image.size == (40, 30)
    red, green, blue = image.getpixel((20, 15))
    assert red > 180 and green < 70 and blue < 40


@pytest.mark.parametrize(
    ("mode", "fmt", "color", "expected"),
    [
        ("L", "PNG", 128, (128, 128, 128)),
        ("LA", "PNG", (0, 0), (255, 255, 255)),  # fully transparent → white
        ("RGBA", "PNG", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", "PNG", (255, 0, 0, 0), (255, 255, 255)),
        ("CMYK", "JPEG", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_modes_become_rgb(mode: str, fmt: str, color: object, expected: tuple[int, ...]) -> None:
    image = decode_image(encoded(Image.new(mode, (8, 8), color), fmt), **LIMITS)
    assert image.mode == "RGB"
    assert np.abs(np.subtract(image.getpixel((4, 4)), expected)).max() <= 3


def test_palette_with_transparency_becomes_rgb_over_white() -> None:
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    data = encoded(palette, "PNG", transparency=1)
    assert decode_image(data, **LIMITS).getpixel((0, 0)) == (255, 255, 255)
    opaque = encoded(palette, "PNG")
    assert decode_image(opaque, **LIMITS).getpixel((0, 0)) == (0, 0, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.full((6, 6), 32768, dtype=np.uint16)  # half of the 16-bit range
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    image = decode_image(encoded(sixteen, "PNG"), **LIMITS)
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (40, 20), (0, 0, 0))
    source.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image = decode_image(encoded(source, "JPEG", exif=exif.tobytes()), **LIMITS)
    assert image.size == (20, 40)
    assert image.getpixel((10, 5))[0] > 200  # the white half is now on top
    assert image.getpixel((10, 35))[0] < 50


def test_reads_paths_and_files(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 7)).save(path)
    assert decode_image(path, **LIMITS).size == (5, 7)
    with path.open("rb") as file:
        assert decode_image(file, **LIMITS).size == (5, 7)


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", ImageError, "empty"),
        (b"hello, not an image", UnsupportedImageFormat, "JPEG, PNG or WebP"),
        (encoded(Image.new("RGB", (4, 4)), "GIF"), UnsupportedImageFormat, "GIF"),
        (encoded(Image.new("RGB", (4, 4)), "BMP"), UnsupportedImageFormat, "BMP"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], ImageError, "corrupt"),
        (NOISE_JPEG[: len(NOISE_JPEG) // 2], ImageError, "corrupt"),
    ],
)
def test_bad_inputs_are_rejected_clearly(data: bytes, error: type, words: str) -> None:
    with pytest.raises(error, match=words) as caught:
        decode_image(data, name="content", **LIMITS)
    assert caught.value.field == "content"
    assert str(caught.value).startswith("content: ")


def test_too_many_pixels_is_rejected_before_decoding() -> None:
    data = encoded(Image.new("L", (3000, 2000)), "PNG")  # 6 MP, a few KB compressed
    with pytest.raises(ImageTooLarge, match="6,000,000 pixels; the limit is 4,000,000"):
        decode_image(data, **LIMITS)


def test_a_jpeg_of_many_scans_is_refused_before_decoding() -> None:
    # 4000² (16 MP) of flat grey in 249 KB: the last of its 10 scans 5,000 times more.
    bomb = progressive_bomb(4000, 5000)
    assert len(bomb) < 300_000 and jpeg_scans(bomb, stop_after=10**6) == 5010
    limits = {"max_bytes": 1 << 20, "max_pixels": 20_000_000}
    for check in (decode_image, probe_image):
        with pytest.raises(ImageError, match=f"more than {MAX_JPEG_SCANS} scans"):
            check(bomb, **limits)
    # Cut off mid-scan, it would fail as corrupt if it were decoded: it is refused for its
    # scans, so they were counted first.
    with pytest.raises(ImageError, match="scans"):
        decode_image(bomb[: len(bomb) // 2], **limits)


def test_ordinary_jpegs_have_few_scans() -> None:
    photo = Image.open(Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg")
    assert jpeg_scans(encoded(photo, "JPEG")) == 1
    progressive = encoded(photo, "JPEG", progressive=True)
    assert jpeg_scans(progressive) == 10
    # An EXIF block holding marker-like bytes (as a thumbnail does) is skipped whole.
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 50  # ImageDescription
    assert jpeg_scans(encoded(photo, "JPEG", progressive=True, exif=exif)) == 10
    assert decode_image(progressive, **LIMITS).size == photo.size


def test_only_our_formats_parsers_run() -> None:
    # A TGA has no magic number: Pillow's TGA parser would read it and name it; with only
    # our formats' parsers allowed, nothing names it.
    tga = encoded(Image.new("RGB", (8, 8)), "TGA")
    assert Image.open(io.BytesIO(tga)).format == "TGA"
    with pytest.raises(UnsupportedImageFormat, match="not a JPEG, PNG or WebP") as caught:
        decode_image(tga, **LIMITS)
    assert "TGA" not in str(caught.value)


def test_too_large_file_is_rejected(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "PNG")
    limits = {**LIMITS, "max_bytes": len(data) - 1}
    with pytest.raises(ImageTooLarge, match="limit"):
        decode_image(data, **limits)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLarge, match="limit"):
        decode_image(path, **limits)
    with path.open("rb") as file, pytest.raises(ImageTooLarge, match="limit"):
        decode_image(file, **limits)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        decode_image(tmp_path / "nope.jpg", **LIMITS)


@pytest.mark.parametrize("compress_level", [0, 1, 6, 9])
def test_png_encoding_is_lossless_at_every_level(compress_level: int) -> None:
    # Previews are written at level 1 (worker/reporting.py), results at the default.
    photo = Image.open(io.BytesIO(NOISE_JPEG)).convert("RGB")  # real image statistics
    data = encode_png(photo, compress_level=compress_level)
    assert data.startswith(b"\x89PNG")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(photo))
    if compress_level == 9:
        assert len(data) < len(encode_png(photo, compress_level=0))
