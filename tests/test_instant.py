"""The first picture in a second, against the real service (Redis, a Celery worker, a
preview worker, the web): the feed-forward preview before the first iteration, fast jobs,
``init=fast``, the ETA from measured speeds, inputs served back, "run again"."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.conftest import REPO
from tests.service import live_service, wait_for

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_service(tmp_path_factory.mktemp("instant"), previews=True, preview_every=5) as url:
        yield url


def submit(server: str, photo: Path, **fields: Any) -> requests.Response:
    data = {"style_preset": "starry-night", "backbone": "vgg19-random", **fields}
    with photo.open("rb") as file:
        return requests.post(
            f"{server}/api/jobs", files={"content": ("photo.jpg", file)}, data=data, timeout=30
        )


def job(server: str, body: dict[str, Any]) -> dict[str, Any]:
    return requests.get(server + body["links"]["self"], timeout=10).json()  # type: ignore[no-any-return]


def finished(server: str, body: dict[str, Any]) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (current := job(server, body))["status"] in ("succeeded", "failed") and current,
        TIMEOUT,
        f"job {body['id']} to finish",
        every=0.1,
    )


def png(server: str, url: str) -> Image.Image:
    answer = requests.get(server + url, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    image.load()
    return image


def events(server: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The job's whole event stream, read to its ``done``."""
    seen = []
    with requests.get(server + body["links"]["events"], stream=True, timeout=TIMEOUT) as answer:
        name = None
        for line in answer.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                seen.append((name, json.loads(line.removeprefix("data: "))))
                if name == "done":
                    break
    return seen


def test_the_feed_forward_picture_comes_before_the_first_iteration(
    server: str, sample_images: Path
) -> None:
    photo = sample_images / "content" / "photo.jpg"
    answer = submit(server, photo, size="96", iterations="40", scales="2")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["mode"] == "optimize" and body["preview"] is None
    assert [s["size"] for s in body["scales"]] == [48, 96]
    assert [s["start"] for s in body["scales"]] == [1, 21]
    first = wait_for(lambda: job(server, body)["preview"], 30, "the first preview", every=0.05)
    # The preview worker is idle; the job's own worker starts, too: either may be first,
    # but the feed-forward picture is the one at iteration 0.
    if first["source"] == "feedforward":
        assert first["iteration"] == 0
        picture = png(server, first["url"])
        assert max(picture.size) == 96 and picture.mode == "RGB"
    done = finished(server, body)
    assert done["status"] == "succeeded", done
    assert done["preview"]["source"] == "optimizer" and done["preview"]["iteration"] == 40
    stream = events(server, done)
    previews = [data for name, data in stream if name == "preview"]
    assert previews[-1] == {"iteration": 40, "url": done["links"]["preview"], "source": "optimizer"}
    # The inputs come back as they were sent, for the page's side-by-side view.
    content = requests.get(server + done["links"]["content"], timeout=10)
    assert content.content == photo.read_bytes()
    assert content.headers["Content-Type"] == "image/jpeg"
    style = requests.get(server + done["links"]["styles"][0], timeout=10)
    assert style.status_code == 200 and style.headers["Content-Type"] == "image/jpeg"
    assert requests.get(server + done["links"]["self"] + "/styles/7", timeout=10).status_code == 404


def test_the_preview_is_shown_before_any_iteration_while_the_worker_is_busy(
    server: str, sample_images: Path
) -> None:
    photo = sample_images / "content" / "second.jpg"
    long_job = submit(server, photo, size="128", iterations="2000").json()
    wait_for(lambda: job(server, long_job)["status"] == "running", 60, "the long job to start")
    submitted = time.monotonic()
    waiting = submit(server, photo, size="160", iterations="20").json()
    shown = wait_for(lambda: job(server, waiting)["preview"], 30, "the instant preview")
    latency = time.monotonic() - submitted
    current = job(server, waiting)
    assert current["status"] == "queued" and current["progress"]["iteration"] == 0
    assert shown == {"url": waiting["links"]["preview"], "source": "feedforward", "iteration": 0}
    picture = png(server, shown["url"])
    assert max(picture.size) == 160
    # The wait behind the long job is in the ETA: both come from the workers' measured speed.
    assert current["wait_seconds"] is not None and current["wait_seconds"] > 0
    assert current["eta_seconds"] > current["wait_seconds"]
    stream_url = server + waiting["links"]["events"]
    with requests.get(stream_url, stream=True, timeout=10) as answer:
        lines = []
        for line in answer.iter_lines(decode_unicode=True):
            lines.append(line)
            if line.startswith("event: preview"):
                break
    assert "event: preview" in lines
    requests.post(server + long_job["links"]["cancel"], timeout=10)
    requests.post(server + waiting["links"]["cancel"], timeout=10)
    assert latency < 30  # the bound is the wait_for above; the figure is in bench/first_picture.py


def test_a_fast_job_is_the_feed_forward_picture_at_the_size_asked(
    server: str, sample_images: Path
) -> None:
    answer = submit(server, sample_images / "content" / "photo.jpg", mode="fast", size="200")
    assert answer.status_code == 202, answer.text
    done = finished(server, answer.json())
    assert done["status"] == "succeeded", done
    assert done["mode"] == "fast" and done["progress"] == {"iteration": 0, "total": 0}
    assert done["scales"] == [] and done["runs"][0]["device"] == "cpu (feed-forward)"
    assert done["preview"]["source"] == "feedforward"
    result = png(server, done["links"]["result"])
    assert result.size == (200, 150)
    losses = requests.get(server + done["links"]["losses"], timeout=10).json()
    assert losses["points"] == []
    too_big = submit(server, sample_images / "content" / "photo.jpg", mode="fast", size="1500")
    assert too_big.status_code == 422 and too_big.json()["error"]["field"] == "size"
    unknown = submit(server, sample_images / "content" / "photo.jpg", mode="slow")
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "mode"


def test_init_fast_starts_from_the_feed_forward_picture(server: str, sample_images: Path) -> None:
    photo = sample_images / "content" / "photo.jpg"
    runs = {
        init: submit(server, photo, size="64", iterations="6", seed="3", init=init).json()
        for init in ("content", "fast")
    }
    done = {init: finished(server, body) for init, body in runs.items()}
    assert all(body["status"] == "succeeded" for body in done.values()), done
    assert done["fast"]["params"]["init"] == "fast"
    first = {
        init: requests.get(server + body["links"]["losses"], timeout=10).json()["points"][0]
        for init, body in done.items()
    }
    # Same inputs, options and seed: only the start differs, and it shows from iteration 1.
    assert first["fast"]["total"] != pytest.approx(first["content"]["total"], rel=1e-3)
    results = {init: png(server, body["links"]["result"]) for init, body in done.items()}
    assert results["fast"].tobytes() != results["content"].tobytes()


def test_run_again_with_another_strength(server: str, sample_images: Path) -> None:
    photo = sample_images / "content" / "photo.jpg"
    first = finished(server, submit(server, photo, size="64", iterations="4", seed="5").json())
    again = requests.post(
        server + first["links"]["again"], data={"style_strength": "0.9"}, timeout=30
    )
    assert again.status_code == 202, again.text
    second = again.json()
    assert second["id"] != first["id"]
    assert second["params"]["style_strength"] == 0.9
    assert second["params"]["style_weight"] > first["params"]["style_weight"]
    for same in ("seed", "size", "iterations", "tv_weight", "backbone"):
        assert second["params"][same] == first["params"][same]
    assert second["styles"] == first["styles"]
    assert finished(server, second)["status"] == "succeeded"
    served = requests.get(server + second["links"]["content"], timeout=10).content
    assert served == photo.read_bytes()
    # Only the options may change, and they are checked as in a submission.
    images = requests.post(server + first["links"]["again"], data={"style_preset": "shipwreck"})
    assert images.status_code == 422 and images.json()["error"]["field"] == "style_preset"
    bad = requests.post(server + first["links"]["again"], data={"style_strength": "7"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "style_strength"


def test_the_estimate_rests_on_the_workers_measured_speed(server: str) -> None:
    def estimate(**query: Any) -> dict[str, Any]:
        answer = requests.get(f"{server}/api/estimate", params=query, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()  # type: ignore[no-any-return]

    small = estimate(size=256, iterations=100, scales=2)
    large = estimate(size=512, iterations=100, scales=2)
    assert small["basis"] == "measured" and small["workers"] == 1
    assert 0 < small["run_seconds"] < large["run_seconds"]
    # Four times the pixels at every scale: four times the work.
    assert large["run_seconds"] / small["run_seconds"] == pytest.approx(4, rel=0.05)
    wide = estimate(size=512, iterations=100, scales=2, width=1000, height=250)
    assert wide["run_seconds"] == pytest.approx(large["run_seconds"] / 4, rel=0.05)
    fast = estimate(size=512, mode="fast")
    assert fast["basis"] == "measured" and 0 < fast["run_seconds"] < small["run_seconds"]
    for query in ({"size": "big"}, {"size": 10**6}, {"mode": "slow"}, {"iterations": 0}):
        answer = requests.get(f"{server}/api/estimate", params=query, timeout=10)
        assert answer.status_code == 422, (query, answer.text)


def test_a_preview_worker_runs_without_torch(tmp_path: Path) -> None:
    """What the preview image (Dockerfile ``preview``: no torch) runs: its Celery app and a
    whole picture, with ``import torch`` made to fail."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import worker.previews\n"
        "from worker.context import Context\n"
        "from worker.instant import measure_fast_seconds\n"
        "context = Context(); measure_fast_seconds(context)\n"
        "print(context.activity['fast_seconds'])\n"
    )
    env = {**os.environ, "STYLEQUEUE_DATA_DIR": str(tmp_path),
           "STYLEQUEUE_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) > 0
