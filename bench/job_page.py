"""The README's picture: a finished *Balanced* job's page, on the whole service as ``make
run`` starts it (``stylequeue serve`` on its embedded defaults), submitted through the form
in headless Chromium (Debian's package, driven by Playwright).

    python bench/job_page.py [--photo examples/chelsea.jpg] [--preset starry-night]
        [--out docs/job-page.png]

Every option is the form's default (the *Balanced* speed); the service runs in a temporary
folder and stops at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stylequeue.service import free_port  # noqa: E402

BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo", type=Path, default=REPO / "examples" / "chelsea.jpg")
    parser.add_argument("--preset", default="starry-night")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "job-page.png")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the job")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("job_page: Debian's chromium is needed (apt install chromium)")

    base = Path(tempfile.mkdtemp(prefix="stylequeue-page-"))
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STYLEQUEUE_DATA_DIR": str(base / "var"),
        "STYLEQUEUE_DATABASE_URL": f"sqlite:///{base / 'var' / 'stylequeue.db'}",
        "STYLEQUEUE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # an embedded one
    }
    log = (base / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "stylequeue", "serve"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            sys.exit(f"job_page: the service did not get ready; see {base / 'serve.log'}")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            page.set_input_files("#content", str(args.photo))
            page.check(f"input[name=style_preset][value={args.preset}]")
            page.click("#submit")
            page.wait_for_url("**/jobs/*", timeout=30_000)
            page.wait_for_selector("#result:not([hidden])", timeout=args.timeout * 1000)
            page.wait_for_timeout(1000)  # the last plot update
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"job_page: {args.out}")
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(60)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
