"""Nothing lost when a worker dies: SIGKILL mid-job, again and again.

Real worker processes, a real redis-server and SQLite. Leases are short here (2 s) so the
test is quick; in production they last STYLEQUEUE_LEASE_SECONDS (30 s).
"""

from __future__ import annotations

import dataclasses
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import update

from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.models import Job, JobStatus, StoredImage, utcnow
from tests.service import (
    FAST_RECOVERY,
    RedisServer,
    WorkerProcess,
    service_app,
    service_settings,
    submit_preset,
    wait_for,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    base = tmp_path_factory.mktemp("crash")
    redis_server = RedisServer(base)
    redis_server.start()
    settings = service_settings(
        base, redis_server.url, preview_every=5, checkpoint_every=10, max_attempts=5,
        **FAST_RECOVERY,
    )  # fmt: skip
    yield settings
    redis_server.stop()


def submit(client: FlaskClient, sample_images: Path, iterations: int) -> dict:
    return submit_preset(client, sample_images / "content" / "photo.jpg", iterations)  # type: ignore[no-any-return]


def job(client: FlaskClient, job_id: str) -> dict:
    return client.get(f"/api/jobs/{job_id}").get_json()  # type: ignore[no-any-return]


#: Long enough that the third kill is mid-job on any machine: every worker is started
#: before the job, so between two kills the job runs only from its checkpoint to 15
#: iterations on (and what it runs while the poll sees that), three times: about 100.
ITERATIONS = 150


def test_sigkill_mid_job_three_times_resumes_from_checkpoints_and_loses_nothing(
    client: FlaskClient, settings: Settings, sample_images: Path, tmp_path: Path
) -> None:
    # One per attempt: a worker started mid-job would let the job run on for as long as
    # the start takes (seconds on a loaded machine, the whole job on a fast one).
    workers = [WorkerProcess(settings, f"crash-{i}", tmp_path / f"w{i}.log") for i in range(4)]
    for worker in workers:
        worker.start()
    submitted = submit(client, sample_images, iterations=ITERATIONS)
    job_id = submitted["id"]
    kills = []
    try:
        for round_number in range(3):
            body = wait_for(
                lambda: (
                    (b := job(client, job_id))["status"] == "running"
                    and b["progress"]["iteration"] >= b["resumed_from_iteration"] + 15
                    and b
                ),
                120,
                f"the job to run 15 iterations (round {round_number})",
            )
            assert body["attempts"] == round_number + 1
            victim = next(w for w in workers if body["worker"] == w.name)
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            # The row as the dead worker left it: it ran on between our poll and the kill,
            # and a checkpoint is recorded only once its loss points are stored (and the
            # row's progress with them), so this bounds the checkpoint it can resume from.
            killed_at = (time.monotonic(), job(client, job_id)["progress"]["iteration"])
            workers.remove(victim)
            # Another worker takes the job over once the lease expires, from its checkpoint.
            resumed = wait_for(
                lambda attempts=round_number + 2: (
                    (b := job(client, job_id))["attempts"] == attempts
                    and b["status"] == "running"
                    and b
                ),
                60,
                "another worker to take the job over",
            )
            kills.append((killed_at, time.monotonic() - killed_at[0], resumed))
            assert resumed["worker"] != victim.name
            assert resumed["resumed_from_iteration"] > 0
            assert resumed["resumed_from_iteration"] % settings.checkpoint_every == 0
            assert resumed["resumed_from_iteration"] <= killed_at[1]

        final = wait_for(
            lambda: (b := job(client, job_id))["status"] in ("succeeded", "failed") and b,
            180,
            "the job to finish",
        )
    finally:
        for worker in workers:
            worker.stop()
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 4
    assert final["progress"] == {"iteration": ITERATIONS, "total": ITERATIONS}
    points = client.get(f"/api/jobs/{job_id}/losses?limit=1000").get_json()["points"]
    # No gap, no duplicate.
    assert [p["iteration"] for p in points] == list(range(1, ITERATIONS + 1))
    for _, takeover_seconds, _ in kills:
        assert takeover_seconds < 20  # seconds, not a one-hour visibility timeout
    assert client.get(final["links"]["result"]).status_code == 200
    # The workers after the first on this host start from the speed it measured, without a
    # speed run of their own: a replacement is ready sooner.
    for log in ["w1.log", "w2.log", "w3.log"]:
        assert "remembered from this host's last worker" in (tmp_path / log).read_text()


def test_a_job_that_keeps_killing_its_worker_fails_clearly(
    client: FlaskClient, settings: Settings, sample_images: Path, tmp_path: Path
) -> None:
    submitted = submit(client, sample_images, iterations=30)
    # As if it had been started max_attempts times and its worker had died each time.
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(submitted["id"]))
            .values(
                status=JobStatus.RUNNING,
                attempts=settings.max_attempts,
                lease_owner="dead-worker",
                lease_expires_at=utcnow(),
            )
        )
    engine.dispose()
    final = ended_under_a_new_worker(client, settings, submitted["id"], tmp_path / "survivor.log")
    assert final["status"] == "failed"
    assert final["error"]["code"] == "too_many_attempts"
    assert "limit is 5" in final["error"]["message"]


def ended_under_a_new_worker(
    client: FlaskClient, settings: Settings, job_id: str, log: Path
) -> dict:
    """The job's JSON once it failed or succeeded, with a worker started for it."""
    worker = WorkerProcess(settings, log.stem, log)
    worker.start()
    try:
        return wait_for(  # type: ignore[no-any-return]
            lambda: (b := job(client, job_id))["status"] in ("failed", "succeeded") and b,
            90,
            f"job {job_id} to end",
        )
    finally:
        worker.stop()


def test_a_job_whose_input_is_gone_is_tried_again_then_fails_clearly(
    client: FlaskClient, settings: Settings, tmp_path: Path
) -> None:
    photo = tmp_path / "unique.png"  # its own file: the other tests' photo stays
    Image.effect_noise((80, 60), 50).convert("RGB").save(photo)
    submitted = submit_preset(client, photo, iterations=5)
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as session:
        content = session.get(Job, uuid.UUID(submitted["id"]))
        assert content is not None
        stored = session.get(StoredImage, content.content_sha256)
        assert stored is not None
        key = stored.storage_key
    engine.dispose()
    (Path(settings.data_dir) / "files" / key).unlink()  # the local storage's file
    final = ended_under_a_new_worker(client, settings, submitted["id"], tmp_path / "starter.log")
    assert final["status"] == "failed"
    assert final["error"]["code"] == "too_many_attempts"
    assert "could not start it" in final["error"]["message"]
    # Every attempt gave the job back (none left it running under a dead lease).
    assert [run["outcome"] for run in final["runs"]][:-1] == ["released"] * settings.max_attempts
    assert "could not start it" in (tmp_path / "starter.log").read_text()


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        ({"soft_time_limit": 2.0}, "time_limit"),
        ({"soft_time_limit": 600.0, "hard_time_limit": 2.0}, "hard_time_limit"),
    ],
)
def test_time_limits_stop_a_job(
    settings: Settings, sample_images: Path, tmp_path: Path, limits: dict, code: str
) -> None:
    limited = dataclasses.replace(settings, queue=f"limits-{uuid.uuid4().hex[:8]}", **limits)
    with service_app(limited) as app:
        client = app.test_client()
        worker = WorkerProcess(limited, f"limited-{code}", tmp_path / "worker.log")
        worker.start()
        try:
            submitted = submit(client, sample_images, iterations=5000)
            final = wait_for(
                lambda: (
                    (b := job(client, submitted["id"]))["status"] in ("failed", "succeeded") and b
                ),
                60,
                "the time limit",
            )
            assert final["status"] == "failed"
            assert final["error"]["code"] == code
            assert 0 < final["progress"]["iteration"] < 5000
            if code == "hard_time_limit":  # the worker ended itself, to be restarted
                assert worker.process is not None
                assert worker.process.wait(30) == 70
        finally:
            worker.stop()


def test_finished_jobs_expire_and_their_files_are_deleted(
    settings: Settings, sample_images: Path, tmp_path: Path
) -> None:
    short_lived = dataclasses.replace(
        settings, queue=f"ttl-{uuid.uuid4().hex[:8]}", job_ttl_seconds=1.0
    )
    with service_app(short_lived) as app:
        client = app.test_client()
        worker = WorkerProcess(short_lived, "ttl", tmp_path / "worker.log")
        worker.start()
        try:
            submitted = submit(client, sample_images, iterations=3)
            done = wait_for(
                lambda: (b := job(client, submitted["id"]))["status"] == "succeeded" and b,
                60,
                "the job",
            )
            assert client.get(done["links"]["result"]).status_code == 200
            files = Path(short_lived.data_dir) / "files" / "jobs" / submitted["id"]
            assert (files / "result.png").is_file()
            expired = wait_for(
                lambda: (b := job(client, submitted["id"]))["expired_at"] and b, 30, "the expiry"
            )
        finally:
            worker.stop()
        assert expired["status"] == "succeeded"  # what happened stays on record
        gone = client.get(done["links"]["result"])
        assert gone.status_code == 410 and gone.get_json()["error"]["code"] == "expired"
        assert client.get(done["links"]["preview"]).status_code == 410
        assert not (files / "result.png").exists() and not (files / "preview.png").exists()
        points = client.get(done["links"]["losses"]).get_json()["points"]
        assert len(points) == 3  # the loss curve is a record, not a file: it stays
