"""Shared fixtures: the sample photos and paintings, made small."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def find_sample_images() -> Path:
    """``../shared/images`` beside the checkout (or STYLEQUEUE_SAMPLE_IMAGES)."""
    candidates = [
        os.environ.get("STYLEQUEUE_SAMPLE_IMAGES"),
        REPO.parent / "shared" / "images",
        "/work/shared/images",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "content" / "tubingen.jpg").is_file():
            return Path(candidate)
    raise RuntimeError(
        "sample images not found; set STYLEQUEUE_SAMPLE_IMAGES to the shared/images folder"
    )


@pytest.fixture(scope="session")
def sample_images() -> Path:
    return find_sample_images()


def small(path: Path, long_side: int = 96) -> Image.Image:
    image = Image.open(path).convert("RGB")
    image.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    return image


@pytest.fixture(scope="session")
def content_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "content" / "tubingen.jpg")


@pytest.fixture(scope="session")
def style_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "style" / "starry_night.jpg")


@pytest.fixture(scope="session")
def second_style_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "style" / "shipwreck.jpg")


# The service's Flask app and a client, for a module whose ``settings`` fixture (module
# scoped) says which database, Redis and queue to use.
@pytest.fixture(scope="module")
def app(settings: Any) -> Iterator[Any]:
    from tests.service import service_app

    with service_app(settings) as app:
        yield app


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of the module's own, on a free port."""
    from tests.service import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()
