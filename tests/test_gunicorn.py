"""The production server's settings (gunicorn.conf.py, the Dockerfile's CMD) load, serve,
and give each worker process a listening socket of its own, so that the kernel spreads
connections over the processes. With threads (``--worker-class gthread``, the alternative
to its gevent workers) open event streams leave threads for the status polls; gevent's
many streams are tests/test_streams.py's."""

from __future__ import annotations

import gc
import re
import runpy
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests

from shared.config import Settings
from stylequeue.service import free_port
from tests.conftest import REPO
from tests.service import (
    RedisServer,
    serves,
    service_app,
    service_settings,
    start_gunicorn,
    submit_preset,
    wait_for,
)


def get_healthz(port: int) -> socket.socket:
    """A kept-alive connection that has had one answer (so its worker has accepted it)."""
    return keep_connection(port)[0]


def ask_healthz(client: socket.socket) -> bool:
    """One ``GET /healthz`` on a kept-alive connection; True if the answer says the server
    closes it (``Connection: close``)."""
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}\n"):
        chunk = client.recv(4096)
        assert chunk, answer
        answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200"), answer
    return b"\r\nconnection: close" in head


def keep_connection(port: int) -> tuple[socket.socket, int]:
    """A connection that has had one ``GET /healthz`` answered and stays open, and how
    many before it were closed by their answer (their process held more than its share).
    Each asks at once: gthread hands a new connection to a thread that waits for its
    request, so connections left silent could hold every thread of a process."""
    closed = 0
    while True:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        if not ask_healthz(client):
            return client, closed
        client.close()
        closed += 1


def held_by_each(workers: list[psutil.Process], port: int) -> list[int]:
    return sorted(
        sum(
            1
            for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
        for worker in workers
    )


def listening(process: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    )


@dataclass
class TwoWorkers:
    """gunicorn with 2 worker processes of 2 threads, and the test's connections to it."""

    port: int
    server: subprocess.Popen[bytes]
    clients: list[socket.socket] = field(default_factory=list)  # closed at the end


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[TwoWorkers]:
    """A long keep-alive, so that no connection is closed before the workers' are counted.
    gunicorn's log is printed at the end: pytest shows it when the test failed."""
    settings = Settings.from_env(
        {}, database_url=f"sqlite:///{tmp_path / 'jobs.db'}", data_dir=tmp_path / "data"
    )
    port = free_port()
    flags = (
        f"--bind 127.0.0.1:{port} --worker-class gthread --workers 2 --threads 2 --keep-alive 60"
    )
    running = TwoWorkers(port, start_gunicorn(settings, tmp_path / "gunicorn.log", flags))
    yield running
    for client in running.clients:
        client.close()
    running.server.terminate()
    running.server.wait(30)
    print((tmp_path / "gunicorn.log").read_text())


def test_gunicorn_conf_serves_with_a_socket_per_worker(
    tmp_path: Path, two_workers: TwoWorkers
) -> None:
    port = two_workers.port
    master = psutil.Process(two_workers.server.pid)

    def workers_listening() -> list[psutil.Process] | None:
        workers = master.children()
        try:
            ready = len(workers) == 2 and all(listening(w, port) == 1 for w in workers)
        except psutil.NoSuchProcess:  # a worker that failed to boot: gunicorn.log says
            return None
        return workers if ready else None

    workers = wait_for(workers_listening, 60, "two gunicorn workers listening")
    assert listening(master, port) == 0  # no shared socket inherited from the master

    two_workers.clients += [get_healthz(port) for _ in range(40)]
    owners = Counter(
        worker.pid
        for worker in workers
        for c in worker.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
    )
    # Spread by the kernel's hash of each connection: all 40 on one of the two
    # processes would happen once in 2**39 runs.
    assert len(owners) == 2 and sum(owners.values()) == 40, owners
    # 2 threads a process, and 8 event streams allowed by default: said at start.
    log = (tmp_path / "gunicorn.log").read_text()
    assert "STYLEQUEUE_EVENT_STREAMS=8 is not below the 2 threads" in log


def test_workers_shed_connections_beyond_their_share(two_workers: TwoWorkers) -> None:
    """The kernel's hash splits 60 connections unevenly between two processes more often
    than not (29 to 31 each only three times in ten). A process holding more than one over
    the mean answers "Connection: close" until the split is even; three times over, from
    fresh connections each time. Without the shedding, all three would end even about
    once in 40 runs."""
    port, clients = two_workers.port, two_workers.clients
    master = psutil.Process(two_workers.server.pid)
    wait_for(lambda: serves(f"http://127.0.0.1:{port}"), 60, "gunicorn")
    workers = wait_for(lambda: len(master.children()) == 2 and master.children(), 30, "2")
    closed = 0
    for _ in range(3):
        for _ in range(60):
            client, refused = keep_connection(port)
            clients.append(client)
            closed += refused
        for _ in range(30):  # passes until none is asked to leave
            leaving = [i for i, client in enumerate(clients) if ask_healthz(client)]
            for i in leaving:
                clients[i].close()
                clients[i], refused = keep_connection(port)
                closed += 1 + refused
            if not leaving:
                break
        split = wait_for(
            lambda: (held := held_by_each(workers, port)) and sum(held) == 60 and held,
            10,
            "the connections counted",
        )
        assert split[-1] <= 31, split
        for client in clients:
            client.close()
        clients.clear()
    assert closed > 0  # some split was uneven at first


def test_workers_keep_the_app_out_of_the_garbage_collectors_sight() -> None:
    """A full collection scans every object not frozen, with all the process's threads
    stopped: the hooks freeze the loaded app, then what the first requests left."""
    hooks = runpy.run_path(str(REPO / "gunicorn.conf.py"))
    before = gc.get_freeze_count()
    try:
        hooks["post_worker_init"](SimpleNamespace())
        loaded = gc.get_freeze_count()
        assert loaded > before
        left_by_requests = [[] for _ in range(1000)]
        hooks["pre_request"](SimpleNamespace(nr=99), None)  # not yet
        # Not equal: a frozen object freed meanwhile (another thread's) leaves the count.
        assert gc.get_freeze_count() < loaded + len(left_by_requests)
        hooks["pre_request"](SimpleNamespace(nr=100), None)
        assert gc.get_freeze_count() >= loaded + len(left_by_requests)
    finally:
        gc.unfreeze()


def open_stream(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A connection that asked for ``path``, with what it has read: a refusal whole, or a
    stream's head and its first event."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    answer = b""
    while not re.search(rb"\r\n\r\n(.*\}\}|.*retry: \d+\n\n)", answer, re.S):
        chunk = client.recv(4096)
        assert chunk, answer
        answer += chunk
    return client, answer


def test_open_event_streams_leave_threads_for_polls(tmp_path: Path, sample_images: Path) -> None:
    """More job pages open than the server has threads: the streams beyond the limit are
    refused at once (the page then polls), and a status poll is still answered."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    server: subprocess.Popen[bytes] | None = None
    streams: list[socket.socket] = []
    try:
        settings = service_settings(
            tmp_path, redis_server.url, event_streams=2, event_streams_per_client=8
        )
        with service_app(settings) as app:  # no worker runs: the job stays queued
            photo = sample_images / "content" / "photo.jpg"
            job = submit_preset(app.test_client(), photo, 5)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        flags = f"--bind 127.0.0.1:{port} --worker-class gthread --workers 1 --threads 4"
        server = start_gunicorn(settings, tmp_path / "gunicorn.log", flags)
        wait_for(lambda: serves(base), 60, "gunicorn")
        assert "STYLEQUEUE_EVENT_STREAMS" not in (tmp_path / "gunicorn.log").read_text()
        answers = []
        for _ in range(6):
            stream, head = open_stream(port, job["links"]["events"])
            streams.append(stream)
            answers.append(head)
        opened = [a for a in answers if a.startswith(b"HTTP/1.1 200")]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(opened) == 2 and len(refused) == 4, answers
        assert all(b"text/event-stream" in a for a in opened)
        assert all(b"Retry-After: " in a and b"streams_busy" in a for a in refused), refused
        # Two threads hold the streams; the other two answer the polls.
        for _ in range(20):
            poll = requests.get(base + job["links"]["self"], timeout=5)
            assert poll.status_code == 200 and poll.json()["status"] == "queued"

        def served() -> bool:
            stream, answer = open_stream(port, job["links"]["events"])
            streams.append(stream)
            return answer.startswith(b"HTTP/1.1 200")

        # A client that leaves gives its place back: its stream's next keep-alive fails.
        for stream in streams:
            stream.close()
        streams.clear()
        wait_for(served, 20, "a place given back by a client that left", every=0.5)
        # A stream that ends gives its place back: the job is canceled, the streams say
        # "done" and end, and new ones are served.
        assert requests.post(base + job["links"]["cancel"], timeout=5).ok
        for _ in range(2):
            wait_for(served, 10, "a stream served after the others ended", every=0.3)
    except BaseException:
        if (tmp_path / "gunicorn.log").exists():
            print((tmp_path / "gunicorn.log").read_text())
        raise
    finally:
        for stream in streams:
            stream.close()
        if server is not None:
            server.terminate()
            server.wait(30)
        redis_server.stop()
