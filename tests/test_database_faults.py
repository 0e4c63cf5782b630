"""The database goes away mid-job (a TCP proxy in front of PostgreSQL is cut) and returns.

The API answers 503 with Retry-After meanwhile; the worker keeps optimizing and buffers its
loss points; afterwards every point is there once, the job finishes on its first attempt,
and neither the web nor the worker needed a restart.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import shared.db
from shared.db import IDLE_PING_SECONDS, make_engine
from tests.proxy import TcpProxy
from tests.service import (
    FAST_RECOVERY,
    RedisServer,
    WorkerProcess,
    fresh_database,
    service_settings,
    wait_for,
)
from web import create_app

BASE_URL = os.environ.get("TEST_DATABASE_URL")
pytestmark = pytest.mark.skipif(
    not BASE_URL, reason="needs PostgreSQL: set TEST_DATABASE_URL (.ci/run sets it)"
)
DATABASE = "stylequeue_faults"


@pytest.fixture(scope="module")
def proxied_url() -> Iterator[tuple[str, TcpProxy]]:
    assert BASE_URL is not None
    url = make_url(fresh_database(BASE_URL, DATABASE))
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    through_proxy = url.set(host="127.0.0.1", port=proxy.port, database=DATABASE)
    yield through_proxy.render_as_string(hide_password=False), proxy
    proxy.cut()


def test_database_outage_mid_job(
    proxied_url: tuple[str, TcpProxy], sample_images: Path, tmp_path: Path
) -> None:
    url, proxy = proxied_url
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    settings = service_settings(
        tmp_path, redis_server.url, database_url=url, checkpoint_every=10,
        **{**FAST_RECOVERY, "lease_seconds": 3.0},
    )  # fmt: skip
    app: Flask = create_app({"TESTING": True, "SETTINGS": settings})
    client = app.test_client()
    worker = WorkerProcess(settings, "db-faults", tmp_path / "worker.log")
    worker.start()
    try:
        photo = (sample_images / "content" / "photo.jpg").read_bytes()
        data = {"content": (io.BytesIO(photo), "photo.jpg"), "style_preset": "starry-night",
                "backbone": "vgg19-random", "size": "64", "iterations": "300"}  # fmt: skip
        job = client.post("/api/jobs", data=data, content_type="multipart/form-data").get_json()
        wait_for(
            lambda: client.get(job["links"]["self"]).get_json()["progress"]["iteration"] >= 20,
            60,
            "the job to start",
        )
        proxy.cut()
        outage_started = time.monotonic()
        down = client.get(job["links"]["self"])
        assert down.status_code == 503
        assert down.headers["Retry-After"] == "5"
        assert down.get_json()["error"]["code"] == "database_unavailable"
        data["content"] = (io.BytesIO(photo), "photo.jpg")
        refused = client.post("/api/jobs", data=data, content_type="multipart/form-data")
        assert refused.status_code == 503
        time.sleep(max(0.0, 8 - (time.monotonic() - outage_started)))  # longer than a lease
        proxy.start()

        final = wait_for(
            lambda: (
                (b := client.get(job["links"]["self"])).status_code == 200
                and b.get_json()["status"] in ("succeeded", "failed")
                and b.get_json()
            ),
            120,
            "the job to finish after the outage",
            every=0.2,
        )
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 1  # the worker kept its job through the outage
        points = client.get(job["links"]["losses"] + "?limit=1000").get_json()["points"]
        assert [p["iteration"] for p in points] == list(range(1, 301))
        # Points computed during the outage were buffered and written afterwards.
        during = [p for p in points if 2 < p["elapsed"] - points[19]["elapsed"] < 6]
        assert during
        log = (tmp_path / "worker.log").read_text()
        assert "cannot write, buffering" in log
    finally:
        worker.stop()
        app.extensions["stylequeue"]["engine"].dispose()
        redis_server.stop()


def test_a_pooled_connection_killed_while_idle_is_replaced_unseen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pooled PostgreSQL connections are pinged before use only after sitting idle: one
    killed by the server meanwhile is replaced without an error; one killed and reused at
    once fails that one use, and the pool recovers by itself."""
    assert BASE_URL is not None
    engine = make_engine(BASE_URL, pool_size=1)
    admin = create_engine(BASE_URL, isolation_level="AUTOCOMMIT")

    def backend_pid() -> int:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def kill(pid: int) -> None:
        with admin.connect() as connection:
            connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    try:
        first = backend_pid()
        kill(first)
        time.sleep(IDLE_PING_SECONDS + 0.2)
        second = backend_pid()  # pinged, found dead, replaced: no error
        assert second != first

        # Reused within the window (widened, so that a slow machine cannot make the kill
        # below last longer than it): not pinged.
        monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 60.0)
        kill(second)
        with pytest.raises(DBAPIError) as failed:
            backend_pid()
        assert failed.value.connection_invalidated
        assert backend_pid() not in (first, second)
    finally:
        engine.dispose()
        admin.dispose()


def test_a_light_load_reuses_one_pooled_connection_after_a_burst() -> None:
    """After a burst fills the pool (event streams connecting), reads one at a time keep
    taking the same connection (last in, first out), not each pooled one in turn: each
    of those would have sat idle past IDLE_PING_SECONDS and cost a ping, a transaction."""
    assert BASE_URL is not None
    engine = make_engine(BASE_URL, pool_size=4)
    try:
        burst = [engine.connect() for _ in range(4)]
        for connection in burst:
            connection.execute(text("SELECT 1"))
        for connection in burst:
            connection.close()
        pids = set()
        for _ in range(8):
            with engine.connect() as connection:
                pids.add(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
        assert len(pids) == 1
        assert engine.pool.checkedin() == 4  # the burst's connections stay pooled
    finally:
        engine.dispose()
