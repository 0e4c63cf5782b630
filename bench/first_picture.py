"""The wait for the first picture: from submit to a picture a job's page can show.

Not a test. Starts its own redis-server, a fresh SQLite database, one optimization worker,
one preview worker (``stylequeue preview-worker``) and the Flask app in this process, then:

1. **Busy worker, feed-forward preview.** A long job occupies the only optimization worker;
   ``--jobs`` default jobs (512 px, 300 iterations; the shipped photos × presets in turn)
   are submitted one after another, each timed from the POST to the moment its JSON names
   a preview (polled every 10 ms; the page's event stream looks every 0.25 s on top), then
   canceled. Without the preview worker none of these would show a picture before the long
   job ends.
2. **Idle worker, the optimizer's first preview.** The same jobs with ``fast_previews``
   off, one at a time on the idle worker: the first picture is the optimizer's preview at
   iteration 10 (of the coarsest scale).
3. **The estimate against the run.** For the form's Quick and Balanced presets, the run
   time ``GET /api/estimate`` gives before the submission against the job's own
   ``started_at`` → ``finished_at``, one job at a time on the idle worker.

Usage: ``python bench/first_picture.py [--jobs 20] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from report import bench_settings, machine, start_workers, stop, update_section, wait

from shared.config import Settings
from stylequeue.service import start_embedded_redis
from web import create_app

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("examples/chelsea.jpg", "examples/coffee.jpg")
PRESETS = ("starry-night", "shipwreck", "woman-with-hat", "picasso-self-portrait")


def submit(client: Any, photo: str, preset: str, **fields: str) -> dict[str, Any]:
    data = {
        "content": (io.BytesIO((ROOT / photo).read_bytes()), "photo.jpg"),
        "style_preset": preset,
        "backbone": "vgg19-random",
        **fields,
    }
    answer = client.post("/api/jobs", data=data, content_type="multipart/form-data")
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()  # type: ignore[no-any-return]


def first_picture(client: Any, body: dict[str, Any], started: float) -> tuple[float, str]:
    """Seconds from ``started`` until the job names a preview, and what made it."""
    while True:
        preview = client.get(body["links"]["self"]).get_json()["preview"]
        if preview is not None:
            return time.perf_counter() - started, preview["source"]
        time.sleep(0.01)


def timed_jobs(client: Any, count: int) -> list[dict[str, Any]]:
    pairs = itertools.cycle(itertools.product(PHOTOS, PRESETS))
    results = []
    for _, (photo, preset) in zip(range(count), pairs, strict=False):
        started = time.perf_counter()
        body = submit(client, photo, preset)
        seconds, source = first_picture(client, body, started)
        client.post(body["links"]["cancel"])
        results.append({"photo": photo, "preset": preset, "seconds": seconds, "source": source})
        print(f"{photo} × {preset}: {seconds:.3f} s ({source})", flush=True)
    return results


#: The form's presets (web/pages.py SPEEDS) whose estimate is checked: name, size, iterations.
ESTIMATED = (("quick", 256, 100), ("balanced", 512, 300))


def estimates(client: Any, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(repeats):
        for name, size, iterations in ESTIMATED:
            query = f"size={size}&iterations={iterations}&width=600&height=400"
            expected = client.get(f"/api/estimate?{query}").get_json()["run_seconds"]
            body = submit(client, PHOTOS[1], PRESETS[0], size=str(size), iterations=str(iterations))
            done = wait(
                lambda body=body: (
                    (j := client.get(body["links"]["self"]).get_json())["status"] == "succeeded"
                    and j
                ),
                600,
                "the job",
            )
            took = (
                datetime.fromisoformat(done["finished_at"])
                - datetime.fromisoformat(done["started_at"])
            ).total_seconds()
            rows.append({"preset": name, "estimated": expected, "took": took})
            print(f"{name}: estimated {expected} s, took {took:.1f} s", flush=True)
    return rows


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95)} | {"max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--idle-jobs", type=int, default=5)
    parser.add_argument("--estimate-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/first-picture.json")
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    redis_process, redis_url = start_embedded_redis(scratch)
    settings: Settings = bench_settings(scratch, redis_url)
    processes = []
    try:
        processes += start_workers(settings, 1, scratch, "preview-worker")
        processes += start_workers(settings, 1, scratch)
        client = create_app({"TESTING": True, "SETTINGS": settings}).test_client()
        long_job = submit(client, PHOTOS[0], PRESETS[0], size="512", iterations="5000")
        wait(
            lambda: client.get(long_job["links"]["self"]).get_json()["status"] == "running",
            120,
            "the long job to start",
        )
        busy = timed_jobs(client, args.jobs)
        client.post(long_job["links"]["cancel"])
        wait(
            lambda: client.get(long_job["links"]["self"]).get_json()["status"] == "canceled",
            120,
            "the long job to stop",
        )
        without = create_app(
            {"TESTING": True, "SETTINGS": replace(settings, fast_previews=False)}
        ).test_client()
        idle = timed_jobs(without, args.idle_jobs)
        checked = estimates(without, args.estimate_repeats)
    finally:
        stop(processes)
        redis_process.terminate()
    figures = {
        "machine": machine(),
        "date": f"{datetime.now():%Y-%m-%d}",
        "busy_worker_feedforward": {"jobs": busy, **percentiles([j["seconds"] for j in busy])},
        "idle_worker_optimizer": {"jobs": idle, **percentiles([j["seconds"] for j in idle])},
        "estimates": checked,
    }
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    b, i = figures["busy_worker_feedforward"], figures["idle_worker_optimizer"]
    lines = [
        "## The wait for the first picture",
        "",
        f"`python bench/first_picture.py` on {machine()}, {figures['date']}: default jobs "
        "(512 px, 300 iterations, `vgg19-random`), submit → the job's JSON names a picture "
        "(the page's event stream adds up to 0.25 s). Raw: `bench/results/first-picture.json`.",
        "",
        "| case | jobs | p50 | p95 | max | picture |",
        "|---|---|---|---|---|---|",
        f"| the only worker busy with a long job; one preview worker | {len(busy)} | "
        f"{b['p50']:.2f} s | {b['p95']:.2f} s | {b['max']:.2f} s | feed-forward |",
        f"| an idle worker, previews from the optimizer only (`fast_previews` off) | "
        f"{len(idle)} | {i['p50']:.2f} s | {i['p95']:.2f} s | {i['max']:.2f} s | "
        "iteration 10 |",
        "",
        "The expected run time the form shows (`GET /api/estimate`, from the worker's "
        "measured speed) against the run it announced, one job at a time on the idle worker "
        "(600×400 photo):",
        "",
        "| preset | estimated | took | took / estimated |",
        "|---|---|---|---|",
        *(
            f"| {row['preset']} | {row['estimated']:.1f} s | {row['took']:.1f} s | "
            f"{row['took'] / row['estimated']:.2f} |"
            for row in checked
        ),
    ]
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "first-picture", lines)


if __name__ == "__main__":
    main()
