"""The production server's settings (gunicorn.conf.py, the Dockerfile's CMD) load, serve,
and give each worker process a listening socket of its own, so that the kernel spreads
connections over the processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil

from shared.config import Settings
from stylequeue.service import free_port
from tests.conftest import REPO
from tests.service import wait_for


def get_healthz(port: int) -> socket.socket:
    """A kept-alive connection that has had one answer (so its worker has accepted it)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    answer = b""
    while b'"status":"ok"' not in answer:
        chunk = client.recv(4096)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    return client


def listening(process: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    )


def test_gunicorn_conf_serves_with_a_socket_per_worker(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {}, database_url=f"sqlite:///{tmp_path / 'jobs.db'}", data_dir=tmp_path / "data"
    )
    port = free_port()
    # A long keep-alive, so that no connection is closed before the workers' are counted.
    flags = f"--bind 127.0.0.1:{port} --workers 2 --threads 2 --keep-alive 60"
    env = {**os.environ, **settings.environ(), "GUNICORN_CMD_ARGS": flags}
    log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    clients: list[socket.socket] = []
    try:
        master = psutil.Process(server.pid)

        def workers_listening() -> list[psutil.Process] | None:
            workers = master.children()
            try:
                ready = len(workers) == 2 and all(listening(w, port) == 1 for w in workers)
            except psutil.NoSuchProcess:  # a worker that failed to boot: gunicorn.log says
                return None
            return workers if ready else None

        workers = wait_for(workers_listening, 60, "two gunicorn workers listening")
        assert listening(master, port) == 0  # no shared socket inherited from the master

        clients = [get_healthz(port) for _ in range(40)]
        owners = Counter(
            worker.pid
            for worker in workers
            for c in worker.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
        # Spread by the kernel's hash of each connection: all 40 on one of the two
        # processes would happen once in 2**39 runs.
        assert len(owners) == 2 and sum(owners.values()) == 40, owners
    except BaseException:
        print((tmp_path / "gunicorn.log").read_text())  # pytest shows it with the failure
        raise
    finally:
        for client in clients:
            client.close()
        server.terminate()
        server.wait(30)
        log.close()
