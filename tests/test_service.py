"""The job service end to end with real parts: a redis-server, Celery worker processes,
SQLite (and PostgreSQL when TEST_DATABASE_URL is set), the Flask app."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from shared import broker
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.errors import OptionError
from shared.jobs import Upload, create_job, parse_request
from shared.migrate import downgrade, upgrade
from shared.models import Job, JobRun, JobStyle, LossPoint, StoredImage, utcnow
from shared.storage import checkpoint_key, storage_from_settings
from tests.bad_input import BAD_INPUT, NOISE, encoded
from tests.conftest import REPO
from tests.service import (
    RedisServer,
    WorkerProcess,
    fresh_database,
    make_token,
    service_settings,
    submit,
    wait_for,
)
from web import SECURITY_HEADERS
from web.api import job_json, load_job
from worker import lease
from worker.engine import Checkpoint, Iterate
from worker.reporting import JobReporter

TABLES = {"images", "jobs", "job_styles", "loss_points", "api_tokens", "job_runs"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(
    database_url: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    return service_settings(
        tmp_path_factory.mktemp("service"), redis_server.url, database_url=database_url,
        preview_every=5, checkpoint_every=20,
    )  # fmt: skip


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, "w1", tmp_path_factory.mktemp("logs") / "worker.log")
    process.start()
    yield process
    process.stop()


def wait_status(client: FlaskClient, job_id: str, statuses: set[str], timeout: float = 120) -> Any:
    def current() -> Any:
        body = client.get(f"/api/jobs/{job_id}").get_json()
        return body if body["status"] in statuses else None

    return wait_for(current, timeout, f"job {job_id} to be {statuses}", every=0.05)


def count_rows(settings: Settings) -> tuple[int, int, int]:
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        counts = (
            session.scalar(select(func.count()).select_from(Job)) or 0,
            session.scalar(select(func.count()).select_from(StoredImage)) or 0,
            sum(1 for p in Path(settings.data_dir).rglob("*") if p.is_file()),
        )
    engine.dispose()
    return counts


def test_a_job_runs_from_submit_to_result(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes, settings: Settings
) -> None:
    response = submit(client, photo, painting, iterations=40, style_strength="0.25")
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["status"] == "queued"
    assert response.headers["Location"] == f"/api/jobs/{job['id']}"
    assert job["params"]["iterations"] == 40 and job["progress"] == {"iteration": 0, "total": 40}
    # The strength the form's slider sends, and the style weight it stands for.
    assert job["params"]["style_strength"] == 0.25
    assert job["params"]["style_weight"] == pytest.approx(10**-0.25)

    seen = {wait_status(client, job["id"], {"running", "succeeded"})["status"]}
    done = wait_status(client, job["id"], {"succeeded", "failed"})
    seen.add(done["status"])
    assert done["status"] == "succeeded", done
    assert "running" in seen or done["started_at"] is not None
    assert done["progress"] == {"iteration": 40, "total": 40}
    assert done["worker"] == "w1" and done["device"] == "cpu" and done["attempts"] == 1
    assert done["started_at"] and done["finished_at"] and done["loss"]["total"] > 0

    points = client.get(f"/api/jobs/{job['id']}/losses?limit=1000").get_json()["points"]
    assert [p["iteration"] for p in points] == list(range(1, 41))
    assert points[-1]["total"] < points[0]["total"]
    page = client.get(f"/api/jobs/{job['id']}/losses?after=10&limit=5").get_json()["points"]
    assert [p["iteration"] for p in page] == [11, 12, 13, 14, 15]

    result = client.get(done["links"]["result"])
    assert result.status_code == 200 and result.mimetype == "image/png"
    with Image.open(io.BytesIO(result.data)) as image:
        assert max(image.size) == 64
    assert client.get(done["links"]["preview"]).mimetype == "image/png"


def test_a_phone_photo_is_stylized_upright(
    client: FlaskClient, worker: WorkerProcess, painting: bytes
) -> None:
    # Stored as taken: landscape pixels, and EXIF saying "rotate 90° clockwise to display".
    source = Image.new("RGB", (96, 72), (0, 0, 0))
    source.paste((255, 255, 255), (0, 0, 48, 72))  # left half white: the top, upright
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", exif=exif.tobytes())
    response = submit(client, buffer.getvalue(), painting, content_name="phone.jpg",
                      iterations=2, tv_weight=0, style_weight=0)  # fmt: skip
    assert response.status_code == 202, response.get_json()
    done = wait_status(client, response.get_json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    with Image.open(io.BytesIO(client.get(done["links"]["result"]).data)) as image:
        assert image.size == (48, 64)  # portrait, as the photo is shown
        assert image.convert("L").getpixel((24, 8)) > image.convert("L").getpixel((24, 56))


def test_cancel_mid_run_then_the_worker_takes_the_next_job(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes
) -> None:
    long_job = submit(client, photo, painting, iterations=3000).get_json()
    wait_for(
        lambda: client.get(f"/api/jobs/{long_job['id']}").get_json()["progress"]["iteration"] > 5,
        120,
        "the long job to make progress",
    )
    canceled = client.post(long_job["links"]["cancel"])
    assert canceled.status_code == 202
    done = wait_status(client, long_job["id"], {"canceled", "succeeded", "failed"}, timeout=30)
    assert done["status"] == "canceled"
    assert 5 < done["progress"]["iteration"] < 3000
    # Every reported iteration has its loss point, and none after.
    points = client.get(f"/api/jobs/{long_job['id']}/losses?limit=10000").get_json()["points"]
    assert [p["iteration"] for p in points] == list(range(1, done["progress"]["iteration"] + 1))
    again = client.post(long_job["links"]["cancel"])  # idempotent
    assert again.status_code == 200 and again.get_json()["status"] == "canceled"

    next_job = submit(client, photo, painting, iterations=5).get_json()
    assert wait_status(client, next_job["id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_a_queued_job_is_canceled_at_once_and_never_runs(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes
) -> None:
    blocker = submit(client, photo, painting, iterations=3000).get_json()
    queued = submit(client, photo, painting, iterations=5).get_json()
    body = client.get(f"/api/jobs/{queued['id']}").get_json()
    assert body["status"] == "queued" and body["queue_position"] >= 1
    response = client.post(queued["links"]["cancel"])
    assert response.status_code == 202 and response.get_json()["status"] == "canceled"
    client.post(blocker["links"]["cancel"])
    wait_status(client, blocker["id"], {"canceled"})
    time.sleep(0.5)  # the worker receives the canceled job's message and drops it
    body = client.get(f"/api/jobs/{queued['id']}").get_json()
    assert body["status"] == "canceled" and body["started_at"] is None and body["attempts"] == 0
    assert client.get(body["links"]["result"]).status_code == 409


def read_events(client: FlaskClient, url: str, last_event_id: str | None = None) -> list[dict]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    response = client.get(url, headers=headers, buffered=False)
    assert response.mimetype == "text/event-stream", response.get_data(as_text=True)
    events, current = [], {}
    body = b"".join(response.response)  # type: ignore[arg-type]
    response.close()  # gives the client's stream back
    for line in body.decode().splitlines():
        if not line:
            if "event" in current:
                events.append(current)
            current = {}
        elif line.startswith(("id:", "event:", "data:")):
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return events


def test_event_stream_delivers_losses_and_resumes_from_last_event_id(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes
) -> None:
    job = submit(client, photo, painting, iterations=30).get_json()
    events = read_events(client, job["links"]["events"])  # follows the job live to the end
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "done"
    assert '"succeeded"' in events[-1]["data"]
    losses = [e for e in events if e["event"] == "loss"]
    assert [int(e["id"]) for e in losses] == list(range(1, 31))
    assert "preview" in kinds

    resumed = read_events(client, job["links"]["events"], last_event_id="20")
    resumed_losses = [int(e["id"]) for e in resumed if e["event"] == "loss"]
    assert resumed_losses == list(range(21, 31))
    assert resumed[-1]["event"] == "done"
    # An id past any job's points, even past a 64-bit integer: nothing more to replay, and
    # the stream ends as the finished job's does, with no error mid-stream.
    for huge in ("99999999999999999999", "9" * 5000):
        beyond = read_events(client, job["links"]["events"], last_event_id=huge)
        kinds = [e["event"] for e in beyond]
        assert kinds[0] == "status" and kinds[-1] == "done" and "loss" not in kinds, beyond


@pytest.mark.parametrize(
    ("case", "content", "fields", "status", "code", "field"),
    BAD_INPUT,
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_refused_clearly_and_leaves_nothing(
    client: FlaskClient,
    worker: WorkerProcess,
    photo: bytes,
    painting: bytes,
    settings: Settings,
    case: str,
    content: Any,
    fields: dict[str, Any],
    status: int,
    code: str,
    field: str,
) -> None:
    before = count_rows(settings)
    if content == "photo":
        content = photo
    elif content == "huge":
        content = b"\x89PNG" + b"0" * (settings.max_image_bytes + 10)
    fields = dict(fields)
    style = fields.pop("style", painting)
    response = submit(client, content, style, **fields)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code and error["field"] == field and error["message"]
    assert count_rows(settings) == before


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "LA"])
def test_unusual_modes_are_accepted_and_converted(
    client: FlaskClient, worker: WorkerProcess, painting: bytes, mode: str
) -> None:
    image = NOISE.convert("RGBA") if mode in ("RGBA", "LA") else NOISE
    if mode == "I;16":
        image = Image.fromarray(np.asarray(NOISE.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    data = encoded(image, "JPEG" if mode == "CMYK" else "PNG")
    response = submit(client, data, painting, iterations=1)
    assert response.status_code == 202, response.get_json()
    assert (
        wait_status(client, response.get_json()["id"], {"succeeded", "failed"})["status"]
        == "succeeded"
    )


def test_file_names_are_never_used_for_storage(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes, settings: Settings
) -> None:
    response = submit(client, photo, painting, content_name="../../../../tmp/evil name\x00.png",
                      iterations=1)  # fmt: skip
    assert response.status_code == 202, response.get_json()
    stored = [p for p in Path(settings.data_dir).rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(Path(settings.data_dir).resolve()) for p in stored)
    assert not any("evil" in p.name for p in stored)
    assert not Path("/tmp/evil name.png").exists()


def bearer(settings: Settings, name: str) -> dict[str, str]:
    """A new token's ``Authorization`` header (for the test client's ``environ_base``)."""
    return {"HTTP_AUTHORIZATION": f"Bearer {make_token(settings, name)}"}


def test_presets_status_pages_and_listing(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, settings: Settings
) -> None:
    # Listing needs a token or a session, in open mode too, and shows one's own jobs.
    assert client.get("/api/jobs").status_code == 401
    client.environ_base.update(bearer(settings, "lister"))
    presets = client.get("/api/presets").get_json()["presets"]
    assert {p["name"] for p in presets} >= {"starry-night", "shipwreck"}
    for _ in range(2):  # older jobs, so that the listing has a second page on its own
        older = submit(client, photo, None, iterations=1, style_preset="starry-night")
        assert older.status_code == 202, older.get_json()
        wait_status(client, older.get_json()["id"], {"succeeded"})
    response = submit(client, photo, None, iterations=3, style_preset="starry-night,shipwreck")
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert [s["preset"] for s in job["styles"]] == ["starry-night", "shipwreck"]
    assert job["params"]["style_weights"] == [0.5, 0.5]
    wait_status(client, job["id"], {"succeeded"})

    first = client.get("/api/jobs?limit=2").get_json()
    assert len(first["jobs"]) == 2 and first["next_cursor"]
    assert first["jobs"][0]["id"] == job["id"]  # newest first
    # The listing builds the job from ORM objects, the status poll from Core rows.
    polled = client.get(f"/api/jobs/{job['id']}").get_json()
    assert polled["runs"] and first["jobs"][0] == polled
    second = client.get(f"/api/jobs?limit=2&cursor={first['next_cursor']}").get_json()
    assert second["jobs"]
    assert not {j["id"] for j in first["jobs"]} & {j["id"] for j in second["jobs"]}
    succeeded = client.get("/api/jobs?status=succeeded&limit=100").get_json()["jobs"]
    assert all(j["status"] == "succeeded" for j in succeeded) and succeeded
    assert client.get("/api/jobs?status=bogus").status_code == 422
    other = client.application.test_client()
    other.environ_base.update(bearer(settings, "other"))
    assert other.get("/api/jobs").get_json()["jobs"] == []
    assert client.get(f"/api/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/api/jobs/not-a-uuid").status_code == 404

    assert client.get("/healthz").get_json() == {"status": "ok"}
    for response in (client.get("/healthz"), client.get("/"), client.get(f"/jobs/{job['id']}"),
                     client.get(f"/api/jobs/{uuid.uuid4()}")):  # fmt: skip
        for key, value in SECURITY_HEADERS:  # once each, on pages, JSON and errors alike
            assert response.headers.getlist(key) == [value], (key, response.status_code)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["workers"] >= 1
    spec = client.get("/api/openapi.json").get_json()
    for path in ("/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/losses",
                 "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/result",
                 "/api/jobs/{job_id}/preview", "/api/jobs/{job_id}/cancel", "/healthz",
                 "/readyz"):  # fmt: skip
        assert path in spec["paths"]
    page = client.get("/").get_data(as_text=True)
    assert 'value="vgg19-random" selected' in page  # the worker offers it alone
    assert "weights missing on the workers" in page
    assert "vgg19-random (random filters, no trained weights)" in page
    # The banner says what the offline backbone means for the pictures...
    assert 'id="offline-banner"' in page and "rougher" in page
    # ...until a worker with trained weights is up; the default comes first among them.
    redis_client = broker.connect(settings.redis_url)
    for offered, chosen in ((["vgg19", "vgg19-random"], "vgg19"),
                            (["vgg19", "vgg16-caffe"], "vgg16-caffe")):  # fmt: skip
        beat = {"name": "with-weights", "kind": "cpu", "queues": [settings.queue],
                "backbones": offered}  # fmt: skip
        broker.publish_heartbeat(redis_client, "with-weights", beat, ttl=30)
        try:
            page = client.get("/").get_data(as_text=True)
            assert 'id="offline-banner"' not in page and f'value="{chosen}" selected' in page
        finally:
            broker.remove_heartbeat(redis_client, "with-weights")
    assert client.get(f"/jobs/{job['id']}").status_code == 200
    assert client.get("/jobs").status_code == 200


def test_a_job_naming_no_backbone_takes_the_best_one_the_workers_offer(
    settings: Settings, photo: bytes, painting: bytes
) -> None:
    """As the form does: the README's curl submission (no backbone) runs on the default
    where a worker offers it, else on another trained one, else on the offline one, instead
    of failing; a backbone asked for by name is never swapped."""
    from dataclasses import replace

    uploads = [Upload("content", "c.png", photo), Upload("style", "s.png", painting)]
    online = replace(settings, offline=False)
    both, offline_only = {"vgg19", "vgg19-random"}, {"vgg19-random"}
    every = {"vgg16-caffe", "vgg19", "vgg19-random"}

    def backbone(config: Settings, runnable: set[str] | None, form: dict) -> str:
        return str(parse_request(form, uploads, config, runnable).options.backbone)

    assert backbone(replace(settings, offline=True), None, {}) == "vgg19-random"
    assert backbone(online, offline_only, {}) == "vgg19-random"
    assert backbone(online, both, {}) == "vgg19"
    assert backbone(online, every, {}) == "vgg16-caffe"
    assert backbone(online, None, {}) == "vgg16-caffe"  # no worker seen yet: the default
    assert backbone(online, both, {"backbone": ["vgg19-random"]}) == "vgg19-random"
    with pytest.raises(OptionError, match="no worker can run 'vgg19'"):
        backbone(online, offline_only, {"backbone": ["vgg19"]})


def job_reporter(
    settings: Settings, photo: bytes, painting: bytes, redis_url: str, flush_seconds: float
) -> tuple[Engine, sessionmaker[Session], uuid.UUID, JobReporter]:
    """A new job's row and a reporter for it, as a worker makes them."""
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    uploads = [Upload("content", "c.png", photo), Upload("style", "s.png", painting)]
    # A queued row no message announces: the module's worker finds it (its reconciler) and
    # fails it at once for want of the vgg19 weights, instead of running 2,000 iterations.
    request = parse_request({"iterations": ["2000"], "backbone": ["vgg19"]}, uploads, settings)
    with sessions.begin() as session:
        job_id = create_job(session, storage_from_settings(settings), request).id
    reporter = JobReporter(
        job_id, sessions, storage_from_settings(settings), broker.connect(redis_url),
        flush_seconds=flush_seconds,
    )  # fmt: skip
    return engine, sessions, job_id, reporter


def test_a_job_whose_weights_are_missing_fails_without_naming_server_paths(
    client: FlaskClient, worker: WorkerProcess, settings: Settings, photo: bytes, painting: bytes
) -> None:
    # A row no message announces: the module's worker (no vgg19 weights) finds it and
    # fails it at once; its submitter learns what failed, not where the files are looked for.
    uploads = [Upload("content", "c.png", photo), Upload("style", "s.png", painting)]
    request = parse_request({"backbone": ["vgg19"]}, uploads, settings)
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            job_id = str(create_job(session, storage_from_settings(settings), request).id)
    finally:
        engine.dispose()
    body = wait_status(client, job_id, {"failed"})
    error = body["error"]
    assert error["code"] == "weights_unavailable" and "weights" in error["message"]
    assert "/" not in error["message"] and "vgg19-dcbb9e9d" not in error["message"]


def test_loss_points_are_written_in_batches_not_per_iteration(
    settings: Settings, photo: bytes, painting: bytes, redis_server: RedisServer
) -> None:
    engine, sessions, job_id, reporter = job_reporter(
        settings, photo, painting, redis_server.url, flush_seconds=0.5
    )
    started = time.monotonic()
    for iteration in range(1, 2001):  # 2,000 iterations at about 1,000 per second
        reporter.progress(
            Iterate(iteration=iteration, total=2000, scale=0, scales=1, loss=1.0 / iteration,
                    content=0.5 / iteration, style=0.5 / iteration, tv=0.0,
                    elapsed=time.monotonic() - started)
        )  # fmt: skip
        time.sleep(0.001)
    reporter.close()
    reporter.flush()
    with sessions() as session:
        iterations = session.scalars(
            select(LossPoint.iteration)
            .where(LossPoint.job_id == job_id)
            .order_by(LossPoint.iteration)
        ).all()
        job = session.get(Job, job_id)
        assert job is not None and job.iteration == 2000 and job.loss_total == 1.0 / 2000
    engine.dispose()
    assert list(iterations) == list(range(1, 2001))
    seconds = time.monotonic() - started
    assert reporter.flushes <= seconds / 0.5 + 2  # one write per 0.5 s, not per iteration
    assert reporter.flushes < 20


def test_a_checkpoint_is_written_by_the_writer_thread_after_its_points(
    settings: Settings, photo: bytes, painting: bytes, redis_server: RedisServer
) -> None:
    """``checkpoint`` returns at once, even while a write holds the writer's lock (it ran
    in the engine's thread, between two iterations); the writer then stores the points up
    to it, the file and the row."""
    engine, sessions, job_id, reporter = job_reporter(
        settings, photo, painting, redis_server.url, flush_seconds=3600
    )
    for iteration in range(1, 51):
        reporter.progress(
            Iterate(iteration=iteration, total=2000, scale=0, scales=1, loss=1.0, content=0.5,
                    style=0.5, tv=0.0, elapsed=iteration * 0.01)
        )  # fmt: skip
    image = np.zeros((1, 3, 8, 8), dtype=np.float32)
    with reporter._write_lock:  # a flush in progress, say
        reporter.checkpoint(Checkpoint(iteration=50, scale=0, image=image, options={}, seed=1))
        with sessions() as session:
            assert session.scalar(select(Job.checkpoint_iteration).where(Job.id == job_id)) is None

    def recorded() -> int | None:
        with sessions() as session:
            return session.scalar(select(Job.checkpoint_iteration).where(Job.id == job_id))

    assert wait_for(recorded, 10, "the checkpoint recorded") == 50
    with sessions() as session:
        points = session.scalars(select(LossPoint.iteration).where(LossPoint.job_id == job_id))
        assert sorted(points) == list(range(1, 51))
    stored = storage_from_settings(settings).get(checkpoint_key(job_id))
    assert Checkpoint.load(stored).iteration == 50
    reporter.close()
    engine.dispose()


def test_a_released_job_is_queued_again_and_its_attempt_says_so(
    settings: Settings, photo: bytes, painting: bytes, redis_server: RedisServer
) -> None:
    # What a worker does with a batch partner it claimed but could not start.
    engine, sessions, job_id, reporter = job_reporter(
        settings, photo, painting, redis_server.url, flush_seconds=3600
    )
    reporter.close()
    claim = lease.claim(sessions, job_id, "w9/abc", 30.0, host="h", worker="w9", device="cpu")
    assert claim is not None and claim.attempts == 1
    lease.release(sessions, lease.Claim(job_id, "someone else", 1))  # not ours: no-op
    with sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "running"
    lease.release(sessions, claim)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.lease_expires_at) == ("queued", None, None)
        run = session.get(JobRun, (job_id, 1))
        assert run is not None and run.outcome == "released" and run.ended_at is not None
    again = lease.claim(sessions, job_id, "w9/def", 30.0, host="h", worker="w9", device="cpu")
    assert again is not None and again.attempts == 2  # a release counts as an attempt
    engine.dispose()


def test_a_large_backlog_is_written_once_even_when_sent_again(
    settings: Settings, photo: bytes, painting: bytes, redis_server: RedisServer
) -> None:
    # 12,000 points: what a database outage of two minutes leaves at 100 iterations a
    # second, and more bound values (7 per point) than SQLite takes in one statement.
    engine, sessions, job_id, reporter = job_reporter(
        settings, photo, painting, redis_server.url, flush_seconds=3600
    )
    reporter.close()  # no writer thread: this test flushes

    def feed(first: int, last: int) -> None:
        for iteration in range(first, last + 1):
            reporter.progress(
                Iterate(iteration=iteration, total=12500, scale=0, scales=1, loss=1.0 / iteration,
                        content=0.5, style=0.5, tv=0.0, elapsed=iteration / 100)
            )  # fmt: skip

    feed(1, 12000)
    assert reporter.flush()
    # A flush whose commit was answered but not heard is sent again with newer points.
    feed(11001, 12500)
    assert reporter.flush()
    writes = reporter.flushes
    assert reporter.flush() and reporter.flushes == writes  # nothing new: nothing written
    with sessions() as session:
        rows = session.execute(
            select(LossPoint.iteration, LossPoint.total)
            .where(LossPoint.job_id == job_id)
            .order_by(LossPoint.iteration)
        ).all()
    engine.dispose()
    assert [iteration for iteration, _ in rows] == list(range(1, 12501))
    assert rows[-1].total == 1.0 / 12500


def test_the_status_poll_reads_what_the_orm_loads(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    """The poll's one statement gives a job once per pair of a style and a run; its answer
    must equal the one built from the ORM's objects: here a finished job with 3 styles, 2
    runs and a callback (6 rows), a queued one with no run (its queue position), a failed
    one (its error)."""
    engine = make_engine(settings.database_url)
    image = uuid.uuid4().hex * 2
    succeeded, queued, failed = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with make_sessionmaker(engine)() as session:
        session.add(StoredImage(sha256=image, storage_key="k", width=4, height=3, size_bytes=9))
        session.flush()
        common = {"params": {"size": 64}, "content_sha256": image, "total": 10}
        session.add_all([
            Job(id=succeeded, status="succeeded", iteration=10, attempts=2, started_at=utcnow(),
                finished_at=utcnow(), callback_url="https://example.com/hook", **common),
            Job(id=queued, status="queued", **common),
            Job(id=failed, status="failed", iteration=3, attempts=1, started_at=utcnow(),
                finished_at=utcnow(), error_code="engine_error", error_message="boom", **common),
        ])  # fmt: skip
        session.flush()
        for job_id in (succeeded, queued, failed):
            for position, weight in enumerate((0.5, 0.3, 0.2)):
                session.add(JobStyle(job_id=job_id, position=position, image_sha256=image,
                                     weight=weight, preset=f"p{position}"))  # fmt: skip
        session.add_all([
            JobRun(job_id=succeeded, attempt=2, host="b", worker="w2", device="cpu",
                   resumed_from_iteration=5, outcome="succeeded", ended_at=utcnow()),
            JobRun(job_id=succeeded, attempt=1, host="a", worker="w1", device="cpu",
                   outcome="worker_lost", ended_at=utcnow()),
            JobRun(job_id=failed, attempt=1, host="a", worker="w1", device="cpu",
                   outcome="failed", ended_at=utcnow()),
        ])  # fmt: skip
        session.commit()
    engine.dispose()

    def from_the_orm(job_id: uuid.UUID) -> dict[str, Any]:
        with app.test_request_context():
            return app.json.loads(app.json.dumps(job_json(load_job(str(job_id)))))  # type: ignore[no-any-return]

    for job_id in (succeeded, queued, failed):
        expected = from_the_orm(job_id)
        # The poll's view of the queue may be a second old (web/api/reads.py); this compares
        # the statement with the ORM, so both read it now.
        app.extensions["stylequeue"].pop("queue", None)
        polled = client.get(f"/api/jobs/{job_id}").get_json()
        after = from_the_orm(job_id)
        # Jobs that earlier tests left queued may start meanwhile (this module's worker
        # runs): a queue position can only fall between the two ORM answers.
        positions = [answer.pop("queue_position", None) for answer in (expected, polled, after)]
        if job_id == queued:
            assert positions[2] <= positions[1] <= positions[0], positions
        assert [s["weight"] for s in polled["styles"]] == [0.5, 0.3, 0.2]
        assert polled == expected
    assert [r["attempt"] for r in client.get(f"/api/jobs/{succeeded}").get_json()["runs"]] == [1, 2]
    waiting = client.get(f"/api/jobs/{queued}").get_json()
    assert waiting["runs"] == [] and waiting["queue_position"] >= 1
    assert client.get(f"/api/jobs/{failed}").get_json()["error"]["message"] == "boom"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_queue_snapshot_answers_as_the_queue_query_does(tmp_path: Path, backend: str) -> None:
    """The status polls' snapshot of the queue (one read a second per web process) gives
    every queued job the position and work ahead that its own query gives; past the
    snapshot's length it does not answer (the poll queries then)."""
    from datetime import timedelta

    from shared.queue import QueueSnapshot, queue_ahead
    from tests.service import fresh_database

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    elif os.environ.get("TEST_DATABASE_URL"):
        url = fresh_database(os.environ["TEST_DATABASE_URL"], "stylequeue_queue_snapshot")
    else:
        pytest.skip("PostgreSQL runs when TEST_DATABASE_URL is set (.ci/run sets it)")
    upgrade(url)
    engine = make_engine(url)
    image = uuid.uuid4().hex * 2
    start = utcnow()
    try:
        with make_sessionmaker(engine)() as session:
            session.add(StoredImage(sha256=image, storage_key="k", width=4, height=3,
                                    size_bytes=9))  # fmt: skip
            session.flush()
            jobs = [
                Job(id=uuid.uuid4(), status=status, params={}, content_sha256=image,
                    created_at=start + timedelta(seconds=second), work=work, total=total,
                    iteration=iteration)
                for second, (status, work, total, iteration) in enumerate([
                    ("running", 1000, 100, 40), ("queued", 300, 10, 0),
                    ("succeeded", 5000, 10, 10), ("queued", 200, 10, 0),
                    ("queued", 0, 10, 0), ("running", 500, 50, 10), ("queued", 700, 10, 0),
                ])
            ]  # fmt: skip
            session.add_all(jobs)
            session.commit()
            # As the poll has them: read back (SQLite's come without their time zone).
            queued = session.scalars(
                select(Job.created_at).where(Job.status == "queued").order_by(Job.created_at)
            ).all()
            snapshot = QueueSnapshot.read(session, limit=10)
            assert snapshot.whole
            answers = [snapshot.ahead(created) for created in queued]
            assert answers == [queue_ahead(session, created) for created in queued]
            assert [position for position, _ in answers] == [1, 2, 3, 4]
            short = QueueSnapshot.read(session, limit=2)
            assert not short.whole
            assert [short.ahead(created) for created in queued[:2]] == answers[:2]
            assert short.ahead(queued[3]) is None
    finally:
        engine.dispose()


def test_the_web_pools_a_connection_per_thread_and_reads_polls_in_autocommit_on_postgresql(
    app: Flask, settings: Settings
) -> None:
    services = app.extensions["stylequeue"]
    assert services["engine"].pool.size() == settings.database_pool_size == 16
    reader_isolation = services["reader"].get_execution_options().get("isolation_level")
    postgresql = services["engine"].dialect.name == "postgresql"
    assert reader_isolation == ("AUTOCOMMIT" if postgresql else None)


def test_migrations_upgrade_from_empty_and_downgrade(database_url: str, tmp_path: Path) -> None:
    # A database of its own: the module's worker keeps writing to the shared one.
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = fresh_database(database_url, "stylequeue_migrations")
    upgrade(url)
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        downgrade(url, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(url)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_the_web_side_never_imports_torch(settings: Settings) -> None:
    code = (
        "import sys; from web import create_app; from shared.config import Settings; "
        "app = create_app({'SETTINGS': Settings.from_env()}); "
        "app.test_client().get('/'); app.test_client().get('/api/openapi.json'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, **settings.environ()}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def test_idempotency_key_gives_the_same_job_and_refuses_another_body(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes, settings: Settings
) -> None:
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}

    def post(iterations: int) -> Any:
        data = {
            "content": (io.BytesIO(photo), "p.png"),
            "style": (io.BytesIO(painting), "s.png"),
            "backbone": "vgg19-random",
            "size": "64",
            "iterations": str(iterations),
        }
        form = "multipart/form-data"
        return client.post("/api/jobs", data=data, headers=key, content_type=form)

    first = post(3)
    assert first.status_code == 202
    jobs_before = count_rows(settings)[0]
    again = post(3)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    other = post(4)
    assert other.status_code == 409
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert count_rows(settings)[0] == jobs_before
    # Another anonymous client (another address) with the same key neither replays nor
    # blocks the first one's job: its key is its own.
    elsewhere = {"REMOTE_ADDR": "192.0.2.44"}
    data = {"content": (io.BytesIO(photo), "p.png"), "style": (io.BytesIO(painting), "s.png"),
            "backbone": "vgg19-random", "size": "64", "iterations": "4"}  # fmt: skip
    stranger = client.post("/api/jobs", data=data, headers=key, environ_base=elsewhere,
                           content_type="multipart/form-data")  # fmt: skip
    assert stranger.status_code == 202 and stranger.get_json()["id"] != first.get_json()["id"]
    wait_status(client, first.get_json()["id"], {"succeeded"})
    wait_status(client, stranger.get_json()["id"], {"succeeded", "canceled"})


def test_a_fixed_seed_reuses_a_finished_result_unless_opted_out(
    client: FlaskClient, worker: WorkerProcess, photo: bytes, painting: bytes
) -> None:
    seed = str(uuid.uuid4().int % 10**9)
    original = submit(client, photo, painting, iterations=6, seed=seed).get_json()
    done = wait_status(client, original["id"], {"succeeded"})
    reused = submit(client, photo, painting, iterations=6, seed=seed)
    assert reused.status_code == 201
    body = reused.get_json()
    assert body["status"] == "succeeded" and body["reused_from"] == original["id"]
    assert body["id"] != original["id"] and body["loss"] == done["loss"]
    assert client.get(body["links"]["result"]).data == client.get(done["links"]["result"]).data
    points = client.get(body["links"]["losses"]).get_json()["points"]
    assert [p["iteration"] for p in points] == list(range(1, 7))

    # Another anonymous client gets no one else's result, nor its job's id.
    data = MultiDict({"backbone": "vgg19-random", "size": "64", "iterations": "6",
                      "seed": seed})  # fmt: skip
    data.add("content", FileStorage(io.BytesIO(photo), filename="photo.png"))
    data.add("style", FileStorage(io.BytesIO(painting), filename="painting.png"))
    boundary, body = encode_multipart(data)
    stranger = client.post(
        "/api/jobs", data=body, content_type=f"multipart/form-data; boundary={boundary}",
        environ_base={"REMOTE_ADDR": "192.0.2.45"},
    )  # fmt: skip
    assert stranger.status_code == 202 and stranger.get_json()["reused_from"] is None
    assert original["id"] not in stranger.get_data(as_text=True)

    fresh = submit(client, photo, painting, iterations=6, seed=seed, reuse="false")
    assert fresh.status_code == 202 and fresh.get_json()["reused_from"] is None
    unseeded = submit(client, photo, painting, iterations=6)
    assert unseeded.status_code == 202
    for job in (fresh.get_json(), unseeded.get_json()):
        wait_status(client, job["id"], {"succeeded"})


def test_a_cpu_worker_keeps_freed_memory_for_reuse(worker: WorkerProcess) -> None:
    assert "freed memory stays in the heap for reuse" in worker.log.read_text()
