"""Redis restarted (without persistence) with one job running and one queued: nothing lost.

The worker keeps optimizing through the outage, finishes the running job, reconnects, and
the reconciler sends the queued job's lost message again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.config import Settings
from tests.service import (
    FAST_RECOVERY,
    RedisServer,
    WorkerProcess,
    service_app,
    service_settings,
    submit_preset,
    wait_for,
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    settings = service_settings(
        tmp_path, redis_server.url, checkpoint_every=10, **{**FAST_RECOVERY, "lease_seconds": 3.0}
    )
    return settings


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    with service_app(settings) as app:
        yield app


def submit(client: FlaskClient, sample_images: Path, iterations: int) -> dict:
    photo = sample_images / "content" / "photo.jpg"
    return submit_preset(client, photo, iterations, preset="shipwreck")  # type: ignore[no-any-return]


def test_redis_restart_loses_no_job(
    app: Flask, settings: Settings, redis_server: RedisServer, sample_images: Path, tmp_path: Path
) -> None:
    client = app.test_client()
    worker = WorkerProcess(settings, "faults", tmp_path / "worker.log")
    worker.start()
    try:
        running = submit(client, sample_images, iterations=150)
        queued = submit(client, sample_images, iterations=10)

        def state(job: dict) -> dict:
            return client.get(job["links"]["self"]).get_json()  # type: ignore[no-any-return]

        wait_for(lambda: state(running)["progress"]["iteration"] >= 10, 60, "the first job")
        assert state(queued)["status"] == "queued"
        redis_server.stop()  # the queued job's message goes with it
        before = state(running)["progress"]["iteration"]
        wait_for(
            lambda: state(running)["progress"]["iteration"] > before + 5, 30, "work in the outage"
        )
        redis_server.start()  # same port, empty

        for job in (running, queued):
            final = wait_for(
                lambda job=job: (b := state(job))["status"] in ("succeeded", "failed") and b,
                120,
                f"job {job['id']} after the restart",
            )
            assert final["status"] == "succeeded", final
            points = client.get(job["links"]["losses"] + "?limit=1000").get_json()["points"]
            assert [p["iteration"] for p in points] == list(
                range(1, final["progress"]["total"] + 1)
            )

        # And the worker still takes new jobs.
        later = submit(client, sample_images, iterations=5)
        done = wait_for(lambda: (b := state(later))["status"] == "succeeded" and b, 60, "a new job")
        assert done["attempts"] == 1
    finally:
        worker.stop()
