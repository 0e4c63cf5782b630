"""A batch or a video is checked from its headers before anything is stored: a clear 4xx,
no row, no file. And a good one becomes a parent with its parts, each routed and queued."""

from __future__ import annotations

import io
import itertools
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from flask import Flask
from PIL import Image
from sqlalchemy import func, select

from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.models import Job
from shared.video import pan_clip
from tests.service import png_bytes, submit
from web import create_app

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def clip(frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 12) -> bytes:
    return pan_clip(Image.open(EXAMPLES / "chelsea.jpg"), frames=frames, size=size, fps=fps)


def encoded(codec: str, container: str, pix_fmt: str) -> bytes:
    """Three black frames in ``codec`` inside ``container`` (a codec we refuse, say)."""
    with tempfile.NamedTemporaryFile() as out:
        with av.open(out.name, "w", format=container) as output:
            stream = output.add_stream(codec, rate=5)
            stream.width, stream.height, stream.pix_fmt = 32, 32, pix_fmt
            for _ in range(3):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
                for packet in stream.encode(frame.reformat(format=pix_fmt)):
                    output.mux(packet)
            for packet in stream.encode():
                output.mux(packet)
        return Path(out.name).read_bytes()


def counts(settings: Settings) -> tuple[int, int]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    engine.dispose()
    return jobs, sum(1 for p in Path(settings.data_dir).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_limits(settings: Settings) -> Any:
    limited = replace(settings, max_video_frames=20, max_video_seconds=2.0,
                      max_batch_photos=3, max_job_work=5_000_000)  # fmt: skip
    app = create_app({"SETTINGS": limited})
    yield app
    app.extensions["stylequeue"]["engine"].dispose()


PAINTING = png_bytes(EXAMPLES.parent / "shared" / "presets" / "starry-night.jpg")
GOOD = clip()
REFUSED = [
    ("not a video", b"\x00\x00\x00\x18ftypmp42" + bytes(500), 422, "invalid_image",
     "cannot be parsed"),
    ("cut short", GOOD[: len(GOOD) // 2], 422, "invalid_image", "cannot be parsed"),
    ("a codec we refuse", encoded("ffv1", "matroska", "yuv420p"), 415,
     "unsupported_image_format", "ffv1"),
    ("too many frames", clip(frames=24, fps=24), 413, "image_too_large", "more than 20 frames"),
    ("too long", clip(frames=18, fps=6), 413, "image_too_large", "lasts 3.0 s"),
    ("too much work", clip(frames=20, size=(160, 120), fps=12), 413, "image_too_large", "work"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "data", "status", "code", "words"), REFUSED,
                         ids=[case[0] for case in REFUSED])  # fmt: skip
def test_a_bad_video_is_refused_from_its_header_leaving_nothing(
    small_limits: Flask, what: str, data: bytes, status: int, code: str, words: str
) -> None:
    settings = small_limits.config["SETTINGS"]
    before = counts(settings)
    size = 160 if what == "too much work" else 64
    response = submit(small_limits.test_client(), data, PAINTING, content_name="clip.mp4",
                      size=size, iterations=100)  # fmt: skip
    error = response.get_json()["error"]
    assert (response.status_code, error["code"], error["field"]) == (status, code, "content")
    assert words in error["message"], error["message"]
    assert counts(settings) == before


def test_a_batch_over_the_limit_or_with_a_video_is_refused(small_limits: Flask) -> None:
    photo = png_bytes(EXAMPLES / "coffee.jpg")
    client = small_limits.test_client()
    before = counts(small_limits.config["SETTINGS"])
    for contents, words in (([photo] * 4, "at most 3"), ([photo, GOOD], "one video")):
        response = _post(client, contents)
        assert response.status_code == 422, response.get_json()
        assert words in response.get_json()["error"]["message"]
    assert counts(small_limits.config["SETTINGS"]) == before


def _post(client: Any, contents: list[bytes]) -> Any:
    from werkzeug.datastructures import FileStorage, MultiDict
    from werkzeug.test import encode_multipart

    data = MultiDict({"backbone": "vgg19-random", "size": "64", "iterations": "10"})
    for index, content in enumerate(contents):
        data.add("content", FileStorage(io.BytesIO(content), filename=f"c{index}"))
    data.add("style", FileStorage(io.BytesIO(PAINTING), filename="painting.png"))
    boundary, body = encode_multipart(data)
    return client.post("/api/jobs", data=body,
                       content_type=f"multipart/form-data; boundary={boundary}")  # fmt: skip


def test_a_video_becomes_runs_of_frames_each_queued(app: Flask) -> None:
    response = submit(app.test_client(), GOOD, PAINTING, content_name="clip.mp4", iterations=10)
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["kind"] == "video" and job["queue"] is None
    assert job["video"] == {"width": 64, "height": 48, "frames": 12, "fps": "12/1", "audio": False}
    runs = [item["frames"] for item in job["parts"]["items"]]
    assert runs[0]["first"] == 0 and runs[-1]["stop"] == 12
    assert all(later["first"] < earlier["stop"] for earlier, later in itertools.pairwise(runs))
    # Each run is a job of its own, queued where a worker would take it.
    for item in job["parts"]["items"]:
        part = app.test_client().get(item["url"]).get_json()
        assert part["kind"] == "frames" and part["status"] == "queued" and part["queue"]
    assert job["progress"]["total"] == sum(item["total"] for item in job["parts"]["items"])
    # Run again is for one-picture jobs.
    again = app.test_client().post(f"/api/jobs/{job['id']}/again", data={"size": "48"})
    assert again.status_code == 422
    canceled = app.test_client().post(f"/api/jobs/{job['id']}/cancel")
    assert canceled.status_code == 202
    for item in job["parts"]["items"]:
        assert app.test_client().get(item["url"]).get_json()["status"] == "canceled"
