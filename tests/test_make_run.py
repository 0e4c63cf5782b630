"""`make run` itself, as a newcomer runs it: started in the background on a free port with
no Redis at its URL (so it starts an embedded one), it answers /readyz and completes a job;
Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from tests.conftest import REPO
from tests.service import free_port, submit_and_wait, wait_for


def _child_worker(queue: str) -> int:
    """The pid of the `stylequeue worker` process serving ``queue`` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"worker" in command
            and b"stylequeue" in command
            and (f"STYLEQUEUE_QUEUE={queue}".encode() in environ)
        ):
            return int(entry.name)
    raise AssertionError(f"no worker process for queue {queue}")


def test_make_run_serves_a_job_and_stops_on_ctrl_c(tmp_path: Path, sample_images: Path) -> None:
    port, unused_redis_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STYLEQUEUE_DATA_DIR": str(tmp_path / "var"),
        "STYLEQUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'stylequeue.db'}",
        "STYLEQUEUE_REDIS_URL": f"redis://127.0.0.1:{unused_redis_port}/0",
        "STYLEQUEUE_QUEUE": f"make-run-{uuid.uuid4().hex[:8]}",
        # Online, but the weights' server does not answer: no download is needed.
        "STYLEQUEUE_WEIGHTS_DIR": str(tmp_path / "weights"),
        "STYLEQUEUE_WEIGHTS_MIRROR": f"http://127.0.0.1:{free_port()}/",
        "STYLEQUEUE_OFFLINE": "false",
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    log = (tmp_path / "make-run.log").open("wb")
    make = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if make.poll() is not None:
                raise AssertionError((tmp_path / "make-run.log").read_text())
            try:
                return requests.get(url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, 180, "make run to be ready", every=0.5)
        output = (tmp_path / "make-run.log").read_text()
        assert "started an embedded Redis" in output
        # The default backbone's real weights come with the install: converted once, by
        # serve, with no download.
        assert output.count("stylequeue: converted the vgg16-caffe weights") == 1
        assert "fetching" not in output and "could not" not in output
        page = requests.get(url + "/", timeout=10).text
        assert 'value="vgg16-caffe" selected' in page and 'id="offline-banner"' not in page

        with (sample_images / "content" / "photo.jpg").open("rb") as photo:
            response = requests.post(
                url + "/api/jobs",
                files={"content": ("photo.jpg", photo)},
                data={"style_preset": "starry-night", "size": "64", "iterations": "10"},
                timeout=30,
            )
        assert response.status_code == 202, response.text
        job = response.json()

        def finished() -> dict | None:
            body = requests.get(url + job["links"]["self"], timeout=5).json()
            return body if body["status"] in ("succeeded", "failed", "canceled") else None

        final = wait_for(finished, 120, "the job", every=0.2)
        assert final["status"] == "succeeded", final
        assert final["params"]["backbone"] == "vgg16-caffe"
        assert (
            requests.get(url + final["links"]["result"], timeout=5)
            .headers["Content-Type"]
            .startswith("image/png")
        )

        # A worker that dies is started again by `serve`.
        old_pids = {
            w["pid"] for w in requests.get(url + "/api/workers", timeout=5).json()["workers"]
        }
        worker_pid = _child_worker(env["STYLEQUEUE_QUEUE"])
        assert worker_pid in old_pids
        os.kill(worker_pid, signal.SIGKILL)

        def replaced() -> bool:
            workers = requests.get(url + "/api/workers", timeout=5).json()["workers"]
            return any(w["pid"] not in old_pids for w in workers)

        wait_for(replaced, 120, "serve to start another worker", every=0.5)
        assert "the worker exited (-9); starting another" in (tmp_path / "make-run.log").read_text()

        # `stylequeue submit --wait` against the same server: event-fed progress, result saved.
        out = tmp_path / "submitted.png"
        photo = sample_images / "content" / "second.jpg"
        submitted = submit_and_wait(url, photo, out, iterations=8)
        assert submitted.stdout.splitlines()[0].startswith("job ")
        refused = subprocess.run(
            [sys.executable, "-m", "stylequeue", "submit", str(out), "--preset", "shipwreck",
             "--server", url, "--size", "5", "--backbone", "vgg19-random"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.strip() == (
            "stylequeue: error: size: must be between 16 and 2048, not 5"
        )
    finally:
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            make.wait(60)
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGKILL)
            log.close()
    time.sleep(0.5)
    for port_number in (port,):
        try:
            requests.get(f"http://127.0.0.1:{port_number}/healthz", timeout=1)
            raise AssertionError("the web server is still up after Ctrl-C")
        except requests.ConnectionError:
            pass
