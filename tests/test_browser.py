"""The web page in a real headless Chromium (Debian's package), driven by Playwright:
upload two images, submit, watch the loss plot grow, see the result appear."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.service import live_service, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("STYLEQUEUE_REQUIRE_BROWSER"):
    raise RuntimeError("STYLEQUEUE_REQUIRE_BROWSER is set but no chromium is installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_service(tmp_path_factory.mktemp("browser"), preview_every=5) as url:
        yield url


def test_submit_watch_the_plot_grow_and_see_the_result(
    server: str, sample_images: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    photo, painting = tmp_path / "photo.png", tmp_path / "painting.png"
    for source, target in ((sample_images / "content" / "tubingen.jpg", photo),
                           (sample_images / "style" / "starry_night.jpg", painting)):  # fmt: skip
        image = Image.open(source).convert("RGB")
        image.thumbnail((160, 160))
        image.save(target)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert page.locator("#backbone").input_value() == "vgg19-random"
            page.set_input_files("#content", str(photo))
            page.set_input_files("#style", str(painting))
            page.fill("input[name=size]", "64")
            page.fill("input[name=iterations]", "120")
            page.click("#submit")
            page.wait_for_url("**/jobs/*", timeout=30_000)

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
            assert plotted() == 120
            assert page.locator("#progress-text").inner_text() == "120 / 120"
        finally:
            browser.close()


def test_the_form_shows_an_error_from_the_api(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
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
