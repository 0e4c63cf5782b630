"""Shared fixtures: the sample photos and paintings, made small."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# `make test` runs one test process per core (pytest-xdist), and each starts workers and
# servers of its own. Torch takes as many OpenMP threads as there are cores in every one of
# them; oversubscribed, those threads spin waiting for each other and the suite's CPU time
# grows by most of itself (docs/benchmarks.md, "The test suite"). One thread a process
# (inherited by the processes the tests start) fits. Set before any test imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


#: The sample folder's layout, from images shipped in the repository (examples/SOURCES.md,
#: shared/presets/ATTRIBUTION.md): two photos and the preset paintings.
SAMPLES = {
    "content/photo.jpg": "examples/coffee.jpg",
    "content/second.jpg": "examples/chelsea.jpg",
    "style/starry_night.jpg": "shared/presets/starry-night.jpg",
    "style/shipwreck.jpg": "shared/presets/shipwreck.jpg",
    "style/picasso.jpg": "shared/presets/picasso-self-portrait.jpg",
}


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of ``content/`` photos and ``style/`` paintings, all from the repository."""
    folder = tmp_path_factory.mktemp("samples")
    for name, source in SAMPLES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).symlink_to(REPO / source)
    # The main photo cropped to 4:3 (532×399 of 600×400), the shape the tests' sizes assume
    # (64 px long gives 64×48).
    photo = folder / "content" / "photo.jpg"
    with Image.open(photo) as image:
        cropped = image.crop((34, 0, 566, 399))
    photo.unlink()
    cropped.save(photo, quality=95)
    return folder


def small(path: Path, long_side: int = 96) -> Image.Image:
    image = Image.open(path).convert("RGB")
    image.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    return image


@pytest.fixture(scope="session")
def content_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "content" / "photo.jpg")


@pytest.fixture(scope="session")
def style_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "style" / "starry_night.jpg")


@pytest.fixture(scope="session")
def second_style_image(sample_images: Path) -> Image.Image:
    return small(sample_images / "style" / "shipwreck.jpg")


# A database for the module: SQLite, and the PostgreSQL at TEST_DATABASE_URL where set.
@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'jobs.db'}"
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip("PostgreSQL runs when TEST_DATABASE_URL is set (.ci/run sets it)")
    from tests.service import reset_database

    reset_database(url)
    return url


# The sample photo and painting as small PNGs.
@pytest.fixture(scope="module")
def photo(sample_images: Path) -> bytes:
    from tests.service import png_bytes

    return png_bytes(sample_images / "content" / "photo.jpg")


@pytest.fixture(scope="module")
def painting(sample_images: Path) -> bytes:
    from tests.service import png_bytes

    return png_bytes(sample_images / "style" / "starry_night.jpg")


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


#: The test files that take longest (the CPU's work, or waits for leases and servers), most
#: first: every file over about 5 s. `make test` hands out whole files to its processes in
#: collection order; with the long ones first and only short ones left at the end, the
#: processes end together instead of one finishing a long file alone. Files not named keep
#: their order after these.
LONGEST_FIRST = (
    "test_crash.py", "test_pictures.py", "test_parts.py", "test_engine.py", "test_browser.py",
    "test_memory.py", "test_scale_out.py", "test_schemathesis.py", "test_streams.py",
    "test_batching.py", "test_service.py", "test_streams_busy.py", "test_broker_faults.py",
    "test_instant.py", "test_make_run.py", "test_access.py", "test_weights.py",
    "test_cli.py", "test_allocator.py", "test_gunicorn.py", "test_hostile.py",
    "test_load.py", "test_bench_paced.py", "test_video.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
