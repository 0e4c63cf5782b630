"""A server with no event stream to spare (``STYLEQUEUE_EVENT_STREAMS=0``: each refused
with 503 ``streams_busy``): the job page and ``stylequeue submit --wait`` follow the job by
polling instead, to the end. test_gunicorn.py shows why the places are limited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.service import live_service, submit_and_wait, wait_for
from tests.test_browser import BROWSER_ARGS, CHROMIUM


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_service(tmp_path_factory.mktemp("busy"), event_streams=0, preview_every=5) as url:
        yield url


def submit(server: str, photo: Path, *, size: int, iterations: int) -> dict[str, Any]:
    """A job with the Starry Night preset, through the API over HTTP."""
    answer = requests.post(
        server + "/api/jobs",
        files={"content": ("photo.jpg", photo.read_bytes())},
        data={"style_preset": "starry-night", "backbone": "vgg19-random", "size": str(size),
              "iterations": str(iterations)},
        timeout=30,
    )  # fmt: skip
    assert answer.status_code == 202, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_the_stream_is_refused_with_where_to_poll(server: str, sample_images: Path) -> None:
    job = submit(server, sample_images / "content" / "photo.jpg", size=32, iterations=2)
    refused = requests.get(server + job["links"]["events"], timeout=10)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "10"
    error = refused.json()["error"]
    assert error["code"] == "streams_busy"
    assert job["links"]["self"] in error["message"] and "/losses" in error["message"]
    # An unknown job is still not found, not busy.
    assert requests.get(server + "/api/jobs/nope/events", timeout=10).status_code == 404


def test_submit_wait_follows_the_job_by_polling(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    photo = sample_images / "content" / "second.jpg"
    submitted = submit_and_wait(server, photo, tmp_path / "result.png", iterations=30)
    # The progress bar reached the end from the polled loss points.
    assert "30/30" in submitted.stderr, submitted.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_job_page_follows_the_job_by_polling(server: str, sample_images: Path) -> None:
    from playwright.sync_api import sync_playwright

    job = submit(server, sample_images / "content" / "photo.jpg", size=64, iterations=150)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + job["links"]["page"])
            page.wait_for_selector("#job[data-following=polling]", timeout=30_000)

            def plotted() -> int:
                return int(page.locator("#plot").get_attribute("data-points") or 0)

            page.wait_for_selector("#result:not([hidden])", timeout=180_000)
            assert page.locator("#status").inner_text() == "succeeded"
            assert plotted() == 150
            assert page.locator("#progress-text").inner_text() == "150 / 150"
            assert page.eval_on_selector("#result", "img => img.complete && img.naturalWidth")
            # Previews came while it ran (every 5 iterations): the last one is shown.
            wait_for(
                lambda: page.eval_on_selector("#preview", "img => !img.hidden && img.naturalWidth"),
                10,
                "the preview",
            )
        finally:
            browser.close()
