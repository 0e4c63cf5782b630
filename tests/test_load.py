"""A short load test on loopback: many concurrent pollers and submitters, bounded in count
and time, against a real server, Redis and worker. Zero errors allowed."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import requests

from tests.service import live_service, make_token, service_settings, wait_for

POLLERS, POLLS_EACH = 24, 40
SUBMITTERS, SUBMITS_EACH = 4, 3


def test_concurrent_pollers_and_submitters_get_no_errors(
    tmp_path: Path, sample_images: Path
) -> None:
    photo = (sample_images / "content" / "photo.jpg").read_bytes()
    with live_service(tmp_path) as url:
        with (sample_images / "content" / "photo.jpg").open("rb") as first_photo:
            seed_job = requests.post(
                url + "/api/jobs",
                files={"content": ("photo.jpg", first_photo)},
                data={
                    "style_preset": "starry-night",
                    "backbone": "vgg19-random",
                    "size": "32",
                    "iterations": "2",
                },
                timeout=30,
            ).json()
        outcomes: Counter[str] = Counter()
        submitted: list[str] = []
        lock = threading.Lock()

        def record(outcome: str) -> None:
            with lock:
                outcomes[outcome] += 1

        # Listing needs a token (or a session); the pollers list their own jobs.
        secret = make_token(service_settings(tmp_path, "redis://unused"), "poller")

        def poll() -> None:
            with requests.Session() as session:
                session.headers["Authorization"] = f"Bearer {secret}"
                for index in range(POLLS_EACH):
                    path = seed_job["links"]["self"] if index % 2 else "/api/jobs?limit=5"
                    try:
                        response = session.get(url + path, timeout=30)
                        record(str(response.status_code))
                    except requests.RequestException as error:
                        record(type(error).__name__)

        def submit() -> None:
            with requests.Session() as session:
                for _ in range(SUBMITS_EACH):
                    try:
                        response = session.post(
                            url + "/api/jobs",
                            files={"content": ("photo.jpg", photo)},
                            data={
                                "style_preset": "shipwreck",
                                "backbone": "vgg19-random",
                                "size": "32",
                                "iterations": "2",
                            },
                            timeout=60,
                        )
                        record(str(response.status_code))
                        if response.status_code == 202:
                            with lock:
                                submitted.append(response.json()["links"]["self"])
                    except requests.RequestException as error:
                        record(type(error).__name__)

        threads = [threading.Thread(target=poll) for _ in range(POLLERS)]
        threads += [threading.Thread(target=submit) for _ in range(SUBMITTERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in threads)
        assert outcomes == Counter(
            {"200": POLLERS * POLLS_EACH, "202": SUBMITTERS * SUBMITS_EACH}
        ), outcomes

        def all_done() -> bool:
            statuses = [requests.get(url + path, timeout=10).json()["status"] for path in submitted]
            return all(status == "succeeded" for status in statuses)

        wait_for(all_done, 120, "every submitted job to succeed", every=0.5)
