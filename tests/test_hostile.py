"""Hostile requests against a real server, as an attacker would send them: gunicorn (the
production server) and ``stylequeue web`` (``make run``'s). Each is answered 4xx with a
clear message, leaves no row and no file behind, and the web's memory stays bounded.

The image-shaped attacks whose cost would land on a worker (strip styles, styles at four
times the output's scale) are refused here from their headers; what a worker takes for
the shapes that are accepted is measured in tests/test_memory.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from PIL import Image

from shared.config import Settings
from shared.images import encode_png
from stylequeue.service import free_port
from tests.bad_input import png_with_size
from tests.conftest import REPO
from tests.jpeg_bomb import progressive_bomb
from tests.service import RedisServer, child_env, make_token, service_settings, wait_for
from tests.test_service import count_rows

#: Small limits so that the oversize cases stay quick to send.
MAX_IMAGE_BYTES = 2 * 1024 * 1024
UPLOAD_IDLE_SECONDS, UPLOAD_SECONDS = 2.0, 8.0
UPLOAD_MEMORY_BYTES = 256 * 1024


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    settings: Settings

    def rss(self) -> int:
        """Resident memory of the server and its worker processes, together."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def start(kind: str, settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**child_env(settings), "PYTHONPATH": str(REPO)}
    if kind == "gunicorn":
        # A stream whose client left is noticed at its next keep-alive; the stop need not
        # wait for it (gunicorn's default graceful timeout is 30 s).
        env["GUNICORN_CMD_ARGS"] = (
            f"--bind 127.0.0.1:{port} --workers 1 --threads 8 --graceful-timeout 3"
        )
        command = [sys.executable, "-m", "gunicorn"]
    else:
        command = [sys.executable, "-m", "stylequeue", "web", "--port", str(port)]
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)


@pytest.fixture(scope="module", params=["gunicorn", "stylequeue web"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("hostile")
    redis_server = RedisServer(base)
    redis_server.start()
    settings = service_settings(
        base, redis_server.url, max_image_bytes=MAX_IMAGE_BYTES,
        webhook_hosts="hooks.example", webhook_secret="s",
        # This test's client (127.0.0.1) is not a scraper.
        metrics_networks="192.0.2.0/24", event_streams_per_client=2,
        # Short upload limits, so that the stalled-upload test takes seconds.
        upload_idle_seconds=UPLOAD_IDLE_SECONDS, upload_seconds=UPLOAD_SECONDS,
        upload_memory_bytes=UPLOAD_MEMORY_BYTES, uploads_per_client=2,
    )  # fmt: skip
    port = free_port()
    process = start(str(request.param), settings, port, base / "web.log")
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).ok
        except requests.RequestException:
            return process.poll() is not None

    try:
        wait_for(answers, 60, str(request.param))
        assert process.poll() is None, (base / "web.log").read_text()
        yield Server(url, port, process, settings)
    finally:
        process.terminate()
        process.wait(30)
        redis_server.stop()


def photo() -> bytes:
    return encode_png(Image.linear_gradient("L").convert("RGB").resize((96, 64)))


def files(**extra: Any) -> list[tuple[str, Any]]:
    return [("content", ("photo.png", photo(), "image/png")), *extra.items()]


def post_job(server: Server, data: Any = None, file_parts: Any = None, **kwargs: Any) -> Any:
    data = {"style_preset": "starry-night", "size": "64", "backbone": "vgg19-random",
            **(data or {})}  # fmt: skip
    return requests.post(
        server.url + "/api/jobs", data=data, files=file_parts or files(), timeout=30, **kwargs
    )


def raw(server: Server, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    """What the server answers to ``head`` (and ``body``) on a connection of its own,
    read until it closes or ``timeout`` passes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as client:
        client.sendall(head + body)
        answer = b""
        started = time.monotonic()
        while b"\r\n\r\n" not in answer and time.monotonic() - started < timeout:
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def declared_ten_gigabytes(server: Server, path: str = "/api/jobs") -> tuple[int, str]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + b"Connection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 10737418240\r\n\r\n"
    )
    started = time.monotonic()
    answer = raw(server, head)
    assert time.monotonic() - started < 5, "the answer must come from the headers alone"
    return int(answer.split(b" ", 2)[1]), answer.decode("latin-1")


def status_and_message(response: Any) -> tuple[int, str]:
    try:
        message = response.json()["error"]["message"]
    except ValueError:
        message = response.text
    return response.status_code, message


# (case, the attack: server -> (status, message), expected status, words in the message)
Attack = Callable[[Server], tuple[int, str]]
ATTACKS: list[tuple[str, Attack, int, str]] = [
    ("a declared 10 GB body", declared_ten_gigabytes, 413, ""),
    ("a file part over the image limit",
     lambda s: status_and_message(post_job(s, file_parts=[
         ("content", ("big.png", b"\x89PNG" + b"0" * (MAX_IMAGE_BYTES + 1), "image/png"))])),
     413, "limit"),
    ("a file field a job does not have",
     lambda s: status_and_message(post_job(s, file_parts=files(evil=("x.png", b"x" * 10)))),
     422, "unexpected file field"),
    ("a urlencoded body of 2 MB",
     lambda s: status_and_message(requests.post(
         s.url + "/api/jobs", data={"size": "x" * 2_000_000}, timeout=30)),
     413, "limit"),
    ("a declared 10 GB body to another endpoint",
     lambda s: declared_ten_gigabytes(s, f"/api/jobs/{uuid.uuid4()}/cancel"), 404, ""),
    ("too many form parts",
     lambda s: status_and_message(post_job(s, data={f"f{i}": "1" for i in range(150)})),
     413, ""),
    ("a 20000×1 style",
     lambda s: status_and_message(post_job(s, file_parts=files(
         style=("strip.png", png_with_size(20000, 1), "image/png")))),
     413, "times as long"),
    ("a style over the pixel limit",
     lambda s: status_and_message(post_job(s, file_parts=files(
         style=("bomb.png", png_with_size(100_000, 100_000), "image/png")))),
     413, "pixels"),
    ("a JPEG of 5,000 scans (a decode bomb)",
     lambda s: status_and_message(post_job(s, file_parts=[
         ("content", ("bomb.jpg", progressive_bomb(4000, 5000), "image/jpeg"))])),
     422, "scans"),
    ("5000 style layers",
     lambda s: status_and_message(post_job(s, data={"style_layers": ",".join(["relu1_1"] * 5000)})),
     422, "more than once"),
    ("a foreign Host header (DNS rebinding)",
     lambda s: status_and_message(requests.get(
         s.url + "/api/presets", headers={"Host": "attacker.example"}, timeout=10)),
     400, "not trusted"),
    ("listing everyone's jobs anonymously",
     lambda s: status_and_message(requests.get(s.url + "/api/jobs", timeout=10)),
     401, "token"),
    ("metrics from outside metrics_networks",
     lambda s: status_and_message(requests.get(s.url + "/metrics", timeout=10)),
     403, "METRICS_NETWORKS"),
    ("a callback to a port the allow-list does not name",
     lambda s: status_and_message(post_job(s, data={"callback_url": "http://hooks.example:22/"})),
     422, "port 22"),
]  # fmt: skip


@pytest.mark.parametrize("case", [case for case, *_ in ATTACKS])
def test_a_hostile_request_is_refused_and_leaves_nothing(server: Server, case: str) -> None:
    _, attack, status, words = next(row for row in ATTACKS if row[0] == case)
    before = count_rows(server.settings)
    got, message = attack(server)
    assert got == status, (case, got, message)
    assert message and words in message, (case, message)
    assert count_rows(server.settings) == before, case


def test_jobs_are_owned_streams_capped_and_memory_bounded(server: Server) -> None:
    owner = {"Authorization": f"Bearer {make_token(server.settings)}"}
    other = {"Authorization": f"Bearer {make_token(server.settings)}"}
    # Before the throttle test (file order): it blocks 127.0.0.1's tokens for a minute,
    # which this would otherwise wait out.
    wait_for(
        lambda: (
            requests.get(server.url + "/api/jobs", headers=owner, timeout=10).status_code == 200
        ),
        70,
        "the failed-token window",
        every=1,
    )
    job = post_job(server, headers=owner).json()
    assert job["status"] == "queued", job
    cancel = job["links"]["cancel"]
    # Open mode: whoever knows the id sees the job, but only its owner cancels it.
    for headers in (other, {}):
        refused = requests.post(server.url + cancel, headers=headers, timeout=10)
        assert refused.status_code == 403 and "owner" in refused.json()["error"]["message"]
    listed = requests.get(server.url + "/api/jobs", headers=other, timeout=10).json()["jobs"]
    assert listed == []
    workers = requests.get(server.url + "/api/workers", timeout=10).json()["workers"]
    assert all("job" not in worker for worker in workers)
    ready = requests.get(server.url + "/readyz", timeout=10).text
    assert job["id"] not in ready and str(server.settings.data_dir) not in ready

    # One client holds at most event_streams_per_client streams at once.
    events = server.url + job["links"]["events"]
    opened = [requests.get(events, headers=owner, stream=True, timeout=10) for _ in range(2)]
    try:
        assert [r.status_code for r in opened] == [200, 200]
        third = requests.get(events, headers=owner, stream=True, timeout=10)
        assert third.status_code == 429, third.text
        assert "event streams" in third.json()["error"]["message"]
        third.close()
    finally:
        for response in opened:
            response.close()

    # The web's memory under a burst of the heaviest accepted uploads: decodes are bounded
    # by decode_concurrency, no decoded image is kept, bodies are bounded.
    big = encode_png(Image.effect_noise((1400, 1000), 80).convert("RGB"), compress_level=1)
    assert len(big) < MAX_IMAGE_BYTES
    baseline = server.rss()

    parts = [("content", ("big.png", big, "image/png"))]
    parts += [("style", (f"s{i}.png", big, "image/png")) for i in range(3)]

    def burst() -> None:
        for _ in range(3):
            post_job(server, data={"scales": "1"}, headers=owner, file_parts=parts)

    threads = [threading.Thread(target=burst) for _ in range(6)]
    peak = baseline
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, server.rss())
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    # 6 requests of 4 images each in flight: their bytes (6 × 4 × 1.9 MB) and at most 2
    # decodes of 1.4 MP at once; well under what keeping 24 decoded images would take.
    assert peak - baseline < 200 * 2**20, f"the web grew by {(peak - baseline) / 2**20:.0f} MiB"
    print(f"{server.process.args}: web RSS {baseline / 2**20:.0f} → peak {peak / 2**20:.0f} MiB")


def test_guessing_tokens_is_throttled(server: Server) -> None:
    answers = [
        requests.get(
            server.url + "/api/jobs", headers={"Authorization": f"Bearer guess-{i}"}, timeout=10
        ).status_code
        for i in range(12)
    ]
    assert answers[:10] == [401] * 10 and answers[10:] == [429, 429]
    # A real token from the same address (a NAT, a shared proxy) keeps working, and the
    # guesses go on being refused.
    real = make_token(server.settings)
    served = requests.get(
        server.url + "/api/jobs", headers={"Authorization": f"Bearer {real}"}, timeout=10
    )
    assert served.status_code == 200
    again = requests.get(
        server.url + "/api/jobs", headers={"Authorization": "Bearer guess-13"}, timeout=10
    )
    assert again.status_code == 429


def start_upload(server: Server, source: str, declared: int, send: int) -> socket.socket:
    """A connection from ``source`` (an address of 127/8) that starts a job's upload of
    ``declared`` bytes, sends ``send`` of them and stops."""
    client = socket.create_connection(("127.0.0.1", server.port), timeout=30,
                                      source_address=(source, 0))  # fmt: skip
    part_head = (
        b'--x\r\nContent-Disposition: form-data; name="content"; filename="p.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    head = (
        b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=x\r\n"
        + f"Content-Length: {declared}\r\n\r\n".encode()
    )
    client.sendall(head + part_head + b"\x89PNG" + bytes(send - len(part_head) - 4))
    return client


def answer_of(client: socket.socket, timeout: float) -> bytes:
    client.settimeout(timeout)
    answer = b""
    try:
        while chunk := client.recv(65536):
            answer += chunk
    except TimeoutError:
        pass
    return answer


def test_stalled_uploads_are_dropped_and_hold_no_memory(server: Server) -> None:
    # 24 clients (24 addresses) each start a 1.9 MB upload, send 1.5 MB and stop: held in
    # memory that is 34 MiB; past upload_memory_bytes (256 KiB here) a part waits on disk.
    baseline = server.rss()
    sent = 1_500_000
    clients = [start_upload(server, f"127.0.1.{i}", 1_900_000, sent) for i in range(1, 25)]
    try:
        time.sleep(UPLOAD_IDLE_SECONDS * 0.75)  # the server reads what was sent, then waits
        held = server.rss() - baseline
        # Each stalled upload is dropped after the idle limit: 408, connection closed.
        started = time.monotonic()
        answers = [answer_of(client, UPLOAD_IDLE_SECONDS + 10) for client in clients]
        waited = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), answers[0][:300]
    assert b"stopped sending" in answers[0]
    assert waited < UPLOAD_IDLE_SECONDS + 8
    # 24 × 256 KiB spooled is 6 MiB; the parts in memory would be 34 MiB.
    assert held < 24 * sent / 2, f"the stalled uploads hold {held / 2**20:.0f} MiB"
    print(f"{server.process.args}: 24 stalled uploads hold {held / 2**20:.1f} MiB")


def test_a_client_has_few_uploads_at_once_and_none_lasts_forever(server: Server) -> None:
    first, second = (start_upload(server, "127.0.2.1", 1_000_000, 10_000) for _ in range(2))
    try:
        # The server's threads take up the first two before the third comes (on a loaded
        # machine the third could otherwise be read first, and one of them refused instead).
        time.sleep(0.5)
        third = start_upload(server, "127.0.2.1", 1_000_000, 10_000)
        answer = answer_of(third, 5)
        third.close()
        assert answer.startswith(b"HTTP/1.1 429") and b"uploads" in answer, answer[:300]
        # Another address is not held back by this one.
        other = start_upload(server, "127.0.2.2", 1_000_000, 10_000)
        # A trickle just under the idle limit is cut off at upload_seconds.
        started = time.monotonic()
        answer = b""
        other.settimeout(0.1)
        while time.monotonic() - started < UPLOAD_SECONDS + 10 and not answer:
            with contextlib.suppress(OSError):
                other.sendall(b"0" * 100)
            with contextlib.suppress(TimeoutError):
                answer = other.recv(65536)
            time.sleep(UPLOAD_IDLE_SECONDS / 2)
        other.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"too long" in answer, answer[:300]
        assert UPLOAD_SECONDS - 1 < time.monotonic() - started < UPLOAD_SECONDS + 10
    finally:
        first.close()
        second.close()
