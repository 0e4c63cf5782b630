"""Several machines: two worker "hosts" (separate processes, host names and local folders)
share one Redis, one database (PostgreSQL when TEST_DATABASE_URL is set, else one SQLite
file) and one real S3-compatible server (moto's server mode). Jobs spread over both; one
host is killed mid-job; every job finishes, the lost one resumed on the other host from a
checkpoint only the object store held. No machine's disk holds a job's files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tests.service import (
    FAST_RECOVERY,
    RedisServer,
    WorkerProcess,
    free_port,
    fresh_database,
    service_app,
    service_settings,
    submit_preset,
    wait_for,
)

BUCKET = "stylequeue-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with our bucket."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(endpoint, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    try:
        wait_for(answers, 60, "moto's S3 server")
        boto3.client("s3", endpoint_url=endpoint, **_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


#: Per job: long enough that host-a is killed mid-job, past two checkpoints (every 20).
ITERATIONS = 120


def database_url(tmp_path: Path) -> str:
    """A fresh PostgreSQL database when TEST_DATABASE_URL names a server, else SQLite."""
    base_url = os.environ.get("TEST_DATABASE_URL")
    if not base_url:
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return fresh_database(base_url, "stylequeue_scale")


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_two_hosts_share_the_work_and_one_dies_mid_job(
    tmp_path: Path, s3_endpoint: str, sample_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)  # the web here and the workers' environments
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    settings = service_settings(
        tmp_path / "web", redis_server.url, database_url=database_url(tmp_path),
        storage_url=f"s3://{BUCKET}/{prefix}", s3_endpoint_url=s3_endpoint,
        checkpoint_every=20, preview_every=10, worker_memory_gb=4.0, log_format="json",
        **FAST_RECOVERY,
    )  # fmt: skip

    def host(name: str) -> WorkerProcess:
        local = dataclasses.replace(settings, host_name=name, data_dir=tmp_path / name)
        return WorkerProcess(local, name, tmp_path / f"{name}.log")

    hosts = {"host-a": host("host-a"), "host-b": host("host-b")}
    photo = sample_images / "content" / "photo.jpg"
    try:
        for worker in hosts.values():
            worker.start()
        with service_app(settings) as app:
            client = app.test_client()
            ready = client.get("/readyz").get_json()
            assert sorted(w["host"] for w in ready["capacity"]) == ["host-a", "host-b"]
            assert all(w["memory_bytes"] == 4 * 1024**3 for w in ready["capacity"])

            # Too large for every worker: refused at once, nothing stored.
            too_large = client.post(
                "/api/jobs",
                data={"content": (photo.open("rb"), "photo.jpg"), "style_preset": "starry-night",
                      "backbone": "vgg19-random", "size": "2048"},
                content_type="multipart/form-data",
            )  # fmt: skip
            assert too_large.status_code == 422
            assert too_large.get_json()["error"]["code"] == "job_too_large"
            assert "GiB" in too_large.get_json()["error"]["message"]

            jobs = [submit_preset(client, photo, ITERATIONS) for _ in range(4)]

            def job(job_id: str) -> dict[str, Any]:
                return client.get(f"/api/jobs/{job_id}").get_json()  # type: ignore[no-any-return]

            def running_on_a() -> dict[str, Any] | None:
                for entry in jobs:
                    current = job(entry["id"])
                    on_a = current["worker"] == "host-a" and current["status"] == "running"
                    if on_a and current["progress"]["iteration"] >= 45:  # two checkpoints
                        return current
                return None

            victim = wait_for(running_on_a, 240, "host-a mid-job past a checkpoint", every=0.1)
            busy = scrape(client.get("/metrics").get_data(as_text=True))
            assert victim["queue"] == f"{settings.queue}.cpu"
            process = hosts["host-a"].process
            assert process is not None
            process.send_signal(signal.SIGKILL)
            process.wait(10)

            def all_finished() -> bool:
                return all(job(entry["id"])["status"] == "succeeded" for entry in jobs)

            wait_for(all_finished, 480, "every job to succeed", every=0.5)
            finished = [job(entry["id"]) for entry in jobs]
            resumed = job(victim["id"])
            hosts_used = {run["host"] for entry in finished for run in entry["runs"]}
            after = scrape(client.get("/metrics").get_data(as_text=True))
            result = client.get(resumed["links"]["result"])
            assert result.status_code == 200 and result.data[:4] == b"\x89PNG"
    finally:
        for worker in hosts.values():
            worker.stop()
        redis_server.stop()

    assert hosts_used == {"host-a", "host-b"}
    # /metrics: a busy worker's speed; jobs by status; durations; the live workers.
    speeds = {k: v for k, v in busy.items() if k[0] == "stylequeue_worker_iterations_per_second"}
    assert any(
        dict(labels)["host"] == "host-a" and value > 0 for (_, labels), value in speeds.items()
    )
    assert busy[("stylequeue_jobs", (("status", "running"),))] >= 1
    assert after[("stylequeue_jobs", (("status", "succeeded"),))] == 4
    assert after[("stylequeue_job_duration_seconds_count", ())] == 4
    assert after[("stylequeue_workers", (("kind", "cpu"),))] == 1  # host-a is gone
    assert after[("stylequeue_queue_depth", (("queue", f"{settings.queue}.cpu"),))] == 0
    # Structured logs: JSON lines naming the host and the job they concern.
    records = [json.loads(line) for line in (tmp_path / "host-b.log").read_text().splitlines()
               if line.startswith("{")]  # fmt: skip
    assert any(r["job_id"] == resumed["id"] and r["host"] == "host-b" for r in records)
    lost, taken_over = resumed["runs"]
    assert (lost["host"], lost["outcome"]) == ("host-a", "worker_lost") and lost["ended_at"]
    assert (taken_over["host"], taken_over["outcome"]) == ("host-b", "succeeded")
    assert taken_over["resumed_from_iteration"] >= 20, "resumed from the checkpoint in S3"
    assert resumed["attempts"] == 2 and resumed["progress"]["iteration"] == ITERATIONS
    # The files are in the object store, none on any machine's disk.
    keys = {
        item["Key"]
        for item in boto3.client("s3", endpoint_url=s3_endpoint, **_credentials())
        .list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        .get("Contents", [])
    }
    assert f"{prefix}/jobs/{resumed['id']}/result.png" in keys
    for folder in (tmp_path / "host-a", tmp_path / "host-b", tmp_path / "web" / "data"):
        assert [p for p in files_under(folder) if p.name != "secret_key"] == []
