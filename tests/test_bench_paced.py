"""bench/paced.py, the fixed-rate load behind bench/api.py's latency at the goal's rate,
against a small HTTP server whose delays the test controls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType

import pytest

from tests.test_bench_stats import load_bench_module


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn serves the bench
    # Headers and body go out in two writes: with Nagle's algorithm the second would wait
    # for the client's delayed acknowledgement (40 ms).
    disable_nagle_algorithm = True
    gate = threading.Lock()  # held by the test to stall every answer

    def do_GET(self) -> None:  # http.server's name
        with self.gate:
            pass
        body = b"{}"
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def paced() -> ModuleType:
    return load_bench_module("paced")


def test_sends_at_the_asked_rate(server: ThreadingHTTPServer, paced: ModuleType) -> None:
    run = paced.paced("127.0.0.1", server.server_port, "/ok", rate=200, clients=10, seconds=1.5)
    assert 180 <= run.answered_rate <= 210
    assert run.errors == 0 and run.unanswered == 0
    assert run.latency["50"] < 50


def test_a_stall_shows_in_the_tail_from_when_requests_were_due(
    server: ThreadingHTTPServer, paced: ModuleType
) -> None:
    """The server stops answering for 0.6 s of a 1.5 s run. Requests due during the stall
    wait for it: about 40 % of them, late by up to 0.6 s. Timed from when each was sent,
    only the one in flight per connection (10 of about 300) would show it."""

    def stall() -> None:
        time.sleep(0.5)
        with Handler.gate:
            time.sleep(0.6)

    staller = threading.Thread(target=stall)
    staller.start()
    run = paced.paced("127.0.0.1", server.server_port, "/ok", rate=200, clients=10, seconds=1.5)
    staller.join()
    assert run.latency["90"] > 200
    assert run.latency["50"] < 200
    assert run.errors == 0


def test_counts_other_answers_as_errors(server: ThreadingHTTPServer, paced: ModuleType) -> None:
    run = paced.paced("127.0.0.1", server.server_port, "/gone", rate=100, clients=5, seconds=0.5)
    assert run.errors == round(run.answered_rate * 0.5) > 0
