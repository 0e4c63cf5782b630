"""The web's connections, bound to the app with ``init_app`` (the Flask extension shape)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import redis
from celery import Celery
from flask import Flask, current_app, g
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.models import Job
from shared.storage import Storage, storage_from_settings
from web.feeds import FeedHub, JobCheck
from web.ratelimit import RedisWindows, WindowCounts

_FEEDS_LOCK = threading.Lock()


class ClientPlaces:
    """How many places each client holds, at most ``limit`` each (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str) -> bool:
        with self._lock:
            if self._held.get(client, 0) >= self.limit:
                return False
            self._held[client] = self._held.get(client, 0) + 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            left = self._held.get(client, 0) - 1
            if left > 0:
                self._held[client] = left
            else:
                self._held.pop(client, None)


def _job_rows(reader: Engine) -> JobCheck:
    """The feeds' check (web/feeds.py): the status and iteration of the watched jobs, in
    one query."""
    jobs = Job.__table__

    def check(job_ids: list[str]) -> dict[str, tuple[str, int]]:
        keys = [uuid.UUID(job_id) for job_id in job_ids]
        query = select(jobs.c.id, jobs.c.status, jobs.c.iteration).where(jobs.c.id.in_(keys))
        with reader.connect() as connection:
            return {str(row.id): (row.status, row.iteration) for row in connection.execute(query)}

    return check


class Services:
    """Database sessions, storage, Redis and a Celery client that sends tasks by name."""

    def init_app(self, app: Flask) -> None:
        settings: Settings = app.config["SETTINGS"]
        engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
        redis_client = broker.connect(settings.redis_url)
        redis_windows = RedisWindows(redis_client)
        app.extensions["stylequeue"] = {
            "engine": engine,
            # For the status poll's one read: on PostgreSQL, without the BEGIN and ROLLBACK
            # (two round trips) a transaction would put around it. SQLite's driver begins
            # none for a read, and switching its isolation level costs statements at each
            # checkout, on every poll's path (bench/api.py).
            "reader": engine
            if engine.dialect.name == "sqlite"
            else engine.execution_options(isolation_level="AUTOCOMMIT"),
            "sessions": make_sessionmaker(engine),
            "storage": storage_from_settings(settings),
            "redis": redis_client,
            # This process's side of the per-client request counts (web/ratelimit.py).
            "window_counts": WindowCounts(redis_windows),
            # Set once Redis refuses the counts' script.
            "rate_window_script_refused": redis_windows.script_refused,
            "celery": Celery("stylequeue", broker=settings.redis_url, set_as_current=False),
            # This process's places for open event streams (see Settings.event_streams).
            "event_streams": threading.BoundedSemaphore(max(settings.event_streams, 0)),
            # The event streams each client holds in this process.
            "client_streams": ClientPlaces(max(settings.event_streams_per_client, 1)),
            # Verification decodes of uploads running at once (Settings.decode_concurrency).
            "decode_slots": threading.BoundedSemaphore(max(settings.decode_concurrency, 1)),
            # Uploads each client has in flight (web/uploads.py), and complete submissions
            # read into memory at once.
            "client_uploads": ClientPlaces(max(settings.uploads_per_client, 1)),
            "submission_slots": threading.BoundedSemaphore(max(settings.submissions_at_once, 1)),
        }
        app.teardown_appcontext(self._close_session)

    @staticmethod
    def _get(name: str) -> Any:
        return current_app.extensions["stylequeue"][name]

    @property
    def settings(self) -> Settings:
        return current_app.config["SETTINGS"]  # type: ignore[no-any-return]

    @property
    def reader(self) -> Engine:
        """The engine for read-only statements outside a session (see ``init_app``)."""
        return self._get("reader")  # type: ignore[no-any-return]

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self._get("sessions")  # type: ignore[no-any-return]

    @property
    def session(self) -> Session:
        """The request's session, closed at the end of the request."""
        if "db_session" not in g:
            g.db_session = self.sessions()
        return g.db_session  # type: ignore[no-any-return]

    @property
    def storage(self) -> Storage:
        return self._get("storage")  # type: ignore[no-any-return]

    @property
    def redis(self) -> redis.Redis:
        return self._get("redis")  # type: ignore[no-any-return]

    @property
    def window_counts(self) -> WindowCounts:
        return self._get("window_counts")  # type: ignore[no-any-return]

    @property
    def feeds(self) -> FeedHub:
        """This process's job feeds (web/feeds.py), made at the first stream: after a
        server's fork, each process reads its own."""
        extensions = current_app.extensions["stylequeue"]
        with _FEEDS_LOCK:
            if extensions.get("feeds") is None:
                settings: Settings = current_app.config["SETTINGS"]
                # A client of its own: its XREAD blocks one connection at a time, and a burst
                # of new subscriptions shares a bounded pool (they wait, not open more).
                pool = redis.BlockingConnectionPool.from_url(
                    settings.redis_url, max_connections=16, timeout=10,
                    socket_connect_timeout=2, socket_timeout=30,
                )  # fmt: skip
                client = redis.Redis(connection_pool=pool)
                extensions["feeds"] = FeedHub(
                    client, _job_rows(extensions["reader"]), settings.stream_check_seconds
                )
        return extensions["feeds"]  # type: ignore[no-any-return]

    @property
    def event_streams(self) -> threading.BoundedSemaphore:
        """The process's places for open event streams (none when streams are off)."""
        return self._get("event_streams")  # type: ignore[no-any-return]

    @property
    def client_streams(self) -> ClientPlaces:
        return self._get("client_streams")  # type: ignore[no-any-return]

    @property
    def decode_slots(self) -> threading.BoundedSemaphore:
        """The process's places for decoding an upload (each up to max_image_pixels × 4 B)."""
        return self._get("decode_slots")  # type: ignore[no-any-return]

    @property
    def client_uploads(self) -> ClientPlaces:
        return self._get("client_uploads")  # type: ignore[no-any-return]

    @property
    def submission_slots(self) -> threading.BoundedSemaphore:
        """The process's places for a complete submission read into memory and checked."""
        return self._get("submission_slots")  # type: ignore[no-any-return]

    def enqueue(self, job_id: str, queue: str) -> None:
        celery: Celery = self._get("celery")
        celery.send_task(broker.RUN_JOB_TASK, args=[job_id], queue=queue)

    def enqueue_preview(self, job_id: str) -> None:
        """Ask the preview workers for the job's feed-forward picture."""
        celery: Celery = self._get("celery")
        celery.send_task(broker.PREVIEW_TASK, args=[job_id], queue=self.settings.preview_queue)

    @staticmethod
    def _close_session(_: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()


services = Services()
