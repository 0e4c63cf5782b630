"""Batching: a worker runs queued jobs of one shape as one batch, each still its own job.

A real worker process, started once the jobs are queued so that it finds them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from shared.config import Settings
from tests.service import RedisServer, WorkerProcess, png_bytes, service_settings, submit, wait_for
from tests.test_service import wait_status
from web import create_app


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Settings, FlaskClient]]:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    settings = service_settings(tmp_path, redis.url, batch_jobs=3, preview_every=5,
                                checkpoint_every=50)  # fmt: skip
    app = create_app({"SETTINGS": settings})
    yield settings, app.test_client()
    app.extensions["stylequeue"]["engine"].dispose()
    redis.stop()


#: Per job: enough that the batch is still running when one of its jobs is canceled.
ITERATIONS = 80


def test_queued_jobs_of_one_shape_run_in_batches_each_its_own_job(
    service: tuple[Settings, FlaskClient], sample_images: Path, tmp_path: Path
) -> None:
    settings, client = service
    photo = png_bytes(sample_images / "content" / "photo.jpg")
    paintings = [png_bytes(path) for path in sorted((sample_images / "style").iterdir())[:2]]

    def job(painting: bytes, **fields: Any) -> str:
        response = submit(client, photo, painting, **{"iterations": ITERATIONS, **fields})
        assert response.status_code == 202, response.get_json()
        return str(response.get_json()["id"])

    # Four of one shape, two styles with two weights, and one of another size.
    same = [job(paintings[index % 2], seed=index, style_weight=10.0**(5 + index % 2))
            for index in range(4)]  # fmt: skip
    other = job(paintings[0], size=48)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, "batcher", log)
    worker.start()
    try:
        # The first three run together; cancel the second while they do.
        wait_for(lambda: client.get(f"/api/jobs/{same[1]}").get_json()["progress"]["iteration"]
                 >= 5, 120, "the batch to start")  # fmt: skip
        assert client.post(f"/api/jobs/{same[1]}/cancel").status_code in (200, 202)
        finished = {
            job_id: wait_status(client, job_id, {"succeeded", "failed", "canceled"}, timeout=300)
            for job_id in [*same, other]
        }
    finally:
        worker.stop()

    text = log.read_text()
    assert f"running 3 jobs as one batch: {same[0]}, {same[1]}, {same[2]}" in text, text
    assert text.count("as one batch") == 1  # the fourth and the other size ran alone
    canceled = finished[same[1]]
    assert canceled["status"] == "canceled" and canceled["progress"]["iteration"] < ITERATIONS
    # Ended when it left the batch, not when the batch did.
    assert canceled["finished_at"] < min(finished[j]["finished_at"] for j in (same[0], same[2]))
    curves = {}
    for job_id in [same[0], same[2], same[3], other]:
        done = finished[job_id]
        assert done["status"] == "succeeded", done
        assert done["worker"] == "batcher" and done["attempts"] == 1
        points = client.get(f"/api/jobs/{job_id}/losses?limit=1000").get_json()["points"]
        assert [p["iteration"] for p in points] == list(range(1, ITERATIONS + 1))
        assert points[-1]["total"] < points[0]["total"]
        curves[job_id] = [point["total"] for point in points]
        assert client.get(done["links"]["result"]).status_code == 200
        assert client.get(done["links"]["preview"]).status_code == 200
    # Each job has its own losses: the first and third (the same style and weights; from
    # the content, the seed does not matter) agree at every iteration; the fourth (another
    # style, 10× the style weight) starts elsewhere.
    assert curves[same[2]] == pytest.approx(curves[same[0]], rel=1e-3)
    assert curves[same[3]][0] > 2 * curves[same[0]][0]
    # The batch's jobs started together; the fourth only after them.
    batch_end = max(finished[j]["finished_at"] for j in (same[0], same[2]))
    assert finished[same[3]]["started_at"] >= batch_end


def test_the_batch_size_limit_follows_the_device_unless_set() -> None:
    # Where batches paid in bench/batching.py (2-core CPU) and bench/gpu.sh (an H200).
    default = Settings()
    assert default.batch_size_limit("cpu") == 256
    assert default.batch_size_limit("cuda:0") == 128
    assert default.batch_size_limit("mps") == 256
    chosen = Settings.from_env({"STYLEQUEUE_BATCH_MAX_SIZE": "1024"})
    assert chosen.batch_size_limit("cpu") == chosen.batch_size_limit("cuda:1") == 1024
