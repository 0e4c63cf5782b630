"""The web page in a real headless Chromium (Debian's package), driven by Playwright:
upload two images, submit, watch the loss plot grow, see the result appear."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.bad_input import BAD_INPUT, NOISE, NOT_THROUGH_THE_FORM, encoded
from tests.service import live_service, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("STYLEQUEUE_REQUIRE_BROWSER"):
    raise RuntimeError("STYLEQUEUE_REQUIRE_BROWSER is set but no chromium is installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt install chromium)"
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The live service's URL and its base folder (database and files)."""
    base = tmp_path_factory.mktemp("browser")
    with live_service(base, previews=True, preview_every=5) as url:
        yield url, base


@pytest.fixture(scope="module")
def server(service: tuple[str, Path]) -> str:
    return service[0]


BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_submit_watch_the_plot_grow_and_see_the_result(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    photo, painting = tmp_path / "photo.png", tmp_path / "painting.png"
    for source, target in ((sample_images / "content" / "photo.jpg", photo),
                           (sample_images / "style" / "starry_night.jpg", painting)):  # fmt: skip
        image = Image.open(source).convert("RGB")
        image.thumbnail((160, 160))
        image.save(target)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert page.locator("#backbone").input_value() == "vgg19-random"
            # The live workers, from their heartbeats: host, device, memory offered.
            assert page.locator("#workers").inner_text().startswith("1 worker:")
            assert "cpu" in page.locator("#workers").inner_text()
            # No worker has the ImageNet weights: the banner says what that means.
            assert "vgg19-random" in page.locator("#offline-banner").inner_text()
            page.set_input_files("#content", str(photo))
            page.set_input_files("#style", str(painting))
            page.fill("input[name=size]", "64")
            page.fill("input[name=iterations]", "60")
            # The strength slider: its value shown beside it, and sent with the job.
            assert page.locator("#strength-value").inner_text() == "0.6"
            page.fill("#style_strength", "0.75")
            assert page.locator("#strength-value").inner_text() == "0.75"
            page.click("#submit")
            page.wait_for_url("**/jobs/*", timeout=30_000)
            job_id = page.url.rstrip("/").rsplit("/", 1)[-1]
            params = page.request.get(f"{server}/api/jobs/{job_id}").json()["params"]
            assert params["style_strength"] == 0.75 and params["style_weight"] == 10**1.25

            def plotted() -> int:
                return int(page.locator("#plot").get_attribute("data-points") or 0)

            wait_for(lambda: plotted() >= 5, 120, "the first points on the plot", every=0.1)
            early = plotted()
            wait_for(lambda: plotted() > early, 60, "the plot to grow", every=0.1)
            assert plotted() > early

            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            assert page.locator("#status").inner_text() == "succeeded"
            width = page.eval_on_selector("#result", "img => img.complete && img.naturalWidth")
            assert width == 64
            assert page.locator("#download").get_attribute("href", timeout=5000)
            assert plotted() == 60
            assert page.locator("#progress-text").inner_text() == "60 / 60"
        finally:
            browser.close()


def test_the_form_shows_an_error_from_the_api(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.set_input_files("#content", str(text))
            page.check("input[value=starry-night]")
            page.click("#submit")
            error = page.locator("#form-error")
            error.wait_for(state="visible", timeout=10_000)
            assert error.inner_text().startswith("content: ")
            assert page.url == server + "/"
        finally:
            browser.close()


def stored(base: Path) -> tuple[int, int, int]:
    """Jobs, images and files the service holds."""
    with sqlite3.connect(base / "jobs.db") as db:
        jobs = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        images = db.execute("SELECT count(*) FROM images").fetchone()[0]
    files = sum(1 for path in (base / "data").rglob("*") if path.is_file())
    return jobs, images, files


# A tampered form: the field's inputs replaced by hidden ones carrying the bad values (the
# server must refuse what the page's own controls would not let a user type).
SET_FIELD = """([name, values]) => {
  const form = document.getElementById("job-form");
  form.querySelectorAll(`[name="${name}"]`).forEach((element) => element.remove());
  for (const value of values) {
    const input = document.createElement("input");
    Object.assign(input, { type: "hidden", name, value });
    form.appendChild(input);
  }
}"""


def test_the_bad_input_table_through_the_form(
    service: tuple[str, Path], sample_images: Path
) -> None:
    """Every case of the API's bad-input table, submitted through the page: the form
    shows the API's message for the right field, stays on the page, and nothing is stored."""
    from playwright.sync_api import sync_playwright

    url, base = service
    photo_image = Image.open(sample_images / "content" / "photo.jpg").convert("RGB")
    photo_image.thumbnail((128, 128))
    photo, painting = encoded(photo_image, "PNG"), encoded(NOISE, "PNG")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            # The page's own checks come first: a size below the minimum is not even sent.
            page.fill("input[name=size]", "5")
            assert not page.eval_on_selector("#job-form", "form => form.checkValidity()")
            for case, content, fields, _status, _code, field in BAD_INPUT:
                if case in NOT_THROUGH_THE_FORM:
                    continue
                before = stored(base)
                page.goto(url + "/")
                page.eval_on_selector("#job-form", "form => { form.noValidate = true; }")
                if content == "photo":
                    content = photo
                elif content == "huge":
                    content = b"\x89PNG" + b"0" * (20 * 1024 * 1024 + 10)
                if content is not None:
                    page.set_input_files(
                        "#content",
                        {"name": "photo.png", "mimeType": "image/png", "buffer": content},
                    )
                fields = {"size": "64", **fields}
                style = fields.pop("style", painting)
                if style is not None:
                    page.set_input_files(
                        "#style", {"name": "art.png", "mimeType": "image/png", "buffer": style}
                    )
                for name, value in fields.items():
                    page.evaluate(SET_FIELD, [name, value if isinstance(value, list) else [value]])
                page.click("#submit")
                error = page.locator("#form-error")
                error.wait_for(state="visible", timeout=30_000)
                shown = error.inner_text()
                assert shown.startswith(f"{field}: ") and len(shown) > len(field) + 4, (case, shown)
                assert page.url == url + "/", case
                assert stored(base) == before, case
        finally:
            browser.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    """A full-page PNG in the test's folder, and in ``STYLEQUEUE_SCREENSHOTS`` when set (to
    look at, or for the docs)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    folder = os.environ.get("STYLEQUEUE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / name)
    return path


def test_the_job_page_shows_the_instant_preview_then_the_result_and_runs_again(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    """The product page: the photo, the painting and the current picture side by side, the
    feed-forward picture first, the pyramid's scales on the plot, the result to download,
    and "run again" with another strength. Screenshots at each stage."""
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "photo.jpg"
    image = Image.open(sample_images / "content" / "second.jpg").convert("RGB")
    image.thumbnail((480, 480))
    image.save(photo, quality=92)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server + "/")
            # The presets before the numbers, each with its expected time on this worker.
            quick = page.locator("label:has(input[name=speed][value=quick])")
            wait_for(lambda: "about" in quick.inner_text(), 30, "the presets' estimates")
            page.set_input_files("#content", str(photo))
            page.check("input[value=starry-night]")
            wait_for(lambda: "about" in page.locator("#estimate").inner_text(), 30, "estimate")
            screenshot(page, "form.png", tmp_path)
            page.fill("input[name=size]", "128")
            page.fill("input[name=iterations]", "60")
            # Scales sit among the advanced options (closed): set without opening them.
            page.eval_on_selector("input[name=scales]", "input => { input.value = '2'; }")
            page.click("#submit")
            page.wait_for_url("**/jobs/*", timeout=30_000)
            job_id = page.url.rstrip("/").rsplit("/", 1)[-1]
            # The feed-forward picture first: shown before the optimizer's first preview.
            page.wait_for_selector("#preview:not([hidden])", timeout=30_000)
            first_caption = page.locator("#caption").inner_text()
            loaded = "image => image.complete && image.naturalWidth"
            wait_for(
                lambda: page.eval_on_selector("#content-image", loaded), 10, "the photo beside it"
            )
            screenshot(page, "job-first-picture.png", tmp_path)
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            assert page.locator("#status").inner_text() == "succeeded"
            assert page.locator("#caption").inner_text() == "Result"
            assert page.locator("#download").get_attribute("href")
            assert "64 px" not in page.locator("#plot-note").inner_text()  # the note, not labels
            assert page.locator("#plot-note").is_visible()
            job = page.request.get(f"{server}/api/jobs/{job_id}").json()
            assert [s["size"] for s in job["scales"]] == [64, 128]
            screenshot(page, "job-result.png", tmp_path)
            assert first_caption in ("Instant preview (feed-forward network)", "Iteration 5 of 60")
            # Run it again, stronger: a new job on the same photo, the rest unchanged.
            page.fill("#again-strength", "0.9")
            assert page.locator("#again-strength-value").inner_text() == "0.9"
            page.click("#again")
            page.wait_for_url(lambda url: job_id not in url and "/jobs/" in url, timeout=30_000)
            again = page.request.get(
                f"{server}/api/jobs/{page.url.rstrip('/').rsplit('/', 1)[-1]}"
            ).json()
            assert again["params"]["style_strength"] == 0.9
            assert again["params"]["size"] == 128
            assert again["params"]["seed"] == job["params"]["seed"]
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
        finally:
            browser.close()


def test_the_api_page_renders_the_openapi_document(server: str) -> None:
    """/api/docs: Swagger UI from the service's own files, under the pages' CSP, lists
    every operation of the document and opens one with its parameters."""
    import requests
    from playwright.sync_api import sync_playwright

    document = requests.get(server + "/api/openapi.json", timeout=10).json()
    operations = sum(len(methods) for methods in document["paths"].values())
    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda message: refused.append(message.text)
                    if "Content Security Policy" in message.text else None)  # fmt: skip
            page.goto(server + "/api/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            assert page.locator(".opblock").count() == operations
            page.locator(".opblock-summary-path", has_text="/api/estimate").click()
            # The operation opens as Swagger UI renders it, a moment after the click.
            parameter = page.locator(".parameters-col_name", has_text="iterations")
            parameter.wait_for(state="visible", timeout=10_000)
            assert parameter.is_visible()
        finally:
            browser.close()
    assert refused == []


def test_a_video_job_page_fills_its_parts_and_plays_the_video(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    """A video through the form: the page's grid shows each part as it runs, then the
    steady video plays next to its source."""
    from playwright.sync_api import sync_playwright

    from shared.video import pan_clip, video_info

    clip = tmp_path / "clip.mp4"
    photo = Image.open(sample_images / "content" / "second.jpg")
    clip.write_bytes(pan_clip(photo, frames=6, size=(64, 48), fps=6, step=2))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.set_input_files("#content", str(clip))
            page.check("input[value=starry-night]")
            page.fill("input[name=size]", "64")
            page.fill("input[name=iterations]", "10")
            page.click("#submit")
            page.wait_for_url("**/jobs/*", timeout=30_000)
            assert page.locator("h1").inner_text() == "Your video"
            page.wait_for_selector("#parts .part", timeout=30_000)
            assert "frames 1–6" in page.locator("#parts .part").first.inner_text()
            page.wait_for_selector("#download:not([hidden])", timeout=180_000)
            assert page.locator("#status").inner_text() == "succeeded"
            # The steady video is loaded and playable in Chromium: its frames' size.
            wait_for(
                lambda: page.eval_on_selector("#result-video", "v => v.readyState >= 1"),
                30, "the video's metadata", every=0.2,
            )  # fmt: skip
            size = page.eval_on_selector("#result-video", "v => [v.videoWidth, v.videoHeight]")
            assert size == [64, 48]
            assert page.eval_on_selector("#source-video", "v => v.src").endswith("/content")
            # The instant preview: the feed-forward network over every frame, as an MP4.
            job = page.request.get(page.url.replace("/jobs/", "/api/jobs/")).json()
            preview = page.request.get(server + job["links"]["preview"])
            assert preview.headers["content-type"] == "video/mp4"
            assert job["preview"]["source"] == "feedforward"
            assert video_info(preview.body())[0] == 6
            # A part's tile opens its own page, with its loss curve.
            page.locator("#parts .part-link").first.click()
            page.wait_for_selector("#plot", timeout=10_000)
        finally:
            browser.close()


def test_the_command_line_follows_a_video_and_saves_its_mp4(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    """``stylequeue submit --wait`` on a video (against this module's live service): the
    parts' progress shown, the MP4 saved."""
    import subprocess
    import sys

    from shared.video import pan_clip, video_info
    from tests.service import REPO

    clip = tmp_path / "clip.mp4"
    photo = Image.open(sample_images / "content" / "photo.jpg")
    clip.write_bytes(pan_clip(photo, frames=4, size=(64, 48), fps=4, step=2))
    saved = tmp_path / "out.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "stylequeue", "submit", str(clip), "--preset", "shipwreck",
         "--server", server, "--wait", "-o", str(saved), "--size", "48", "--iterations", "6",
         "--backbone", "vgg19-random"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"done: {saved}" in done.stdout
    assert "parts=1/1" in done.stderr  # its part's progress, shown as it went
    assert video_info(saved.read_bytes())[:2] == (4, 4)
