"""Service benchmarks, side by side in one run: what the job system costs around the engine.

Not a test. Starts its own redis-server, a fresh database (SQLite, or ``--database-url``),
one warm worker process (``stylequeue worker``) and the Flask app in this process.

1. Job system overhead: the same job (128 px, 100 iterations, one scale, fixed seed) run
   by the bare engine in this process and through the queue (``created_at`` to
   ``finished_at``, with the production defaults: a preview every 10 iterations, a
   checkpoint every 50, loss points written in batches), bare, queued and bare again,
   ``--repeats`` times: the median paired ratio with a 95 % confidence interval (the goal
   counts as met only when the whole interval is within it), an A/A control (bare against
   bare, this machine's noise floor), the time outside the engine and the engine's own
   time in the worker.
2. Queue latency: ``--latency-jobs`` tiny jobs, each submitted once the previous one has
   finished (an idle, warm worker): ``created_at`` → ``started_at``, p50 and p99, and a
   histogram; beside it, a bare Celery task (``stylequeue.ping``) on the same Redis and
   worker, from ``send_task`` to the task's start.
3. Loss streaming: a worker's reporter fed loss points as fast as it takes them: the
   points per second it writes to this database (a worker at 100 iterations per second
   needs 100).

Usage: ``python bench/service.py [--database-url URL] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from engine import IMAGES_HELP, sample_pair  # bench/engine.py (run as a script)
from PIL import Image
from report import (  # bench/report.py (run as a script)
    bench_settings,
    machine,
    median_interval,
    start_workers,
    stop,
    update_section,
    wait,
)

from shared import broker
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.jobs import Upload, create_job, parse_request
from shared.models import Job
from shared.storage import storage_from_settings
from stylequeue.service import start_embedded_redis
from web import create_app

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class Service:
    """redis-server, a database, one warm worker and the app, with ``overrides`` of the
    settings."""

    def __init__(self, scratch: Path, database_url: str | None, **overrides: Any) -> None:
        self.redis_process, redis_url = start_embedded_redis(scratch)
        self.settings = bench_settings(scratch, redis_url, database_url, **overrides)
        self.workers = start_workers(self.settings, 1, scratch)
        self.redis = broker.connect(redis_url)
        self.app = create_app({"SETTINGS": self.settings})
        self.client = self.app.test_client()
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))

    def submit(self, photo: bytes, **fields: str) -> uuid.UUID:
        data = {"content": (io.BytesIO(photo), "photo.png"), "style_preset": "starry-night",
                "backbone": "vgg19-random", "scales": "1", **fields}  # fmt: skip
        response = self.client.post("/api/jobs", data=data, content_type="multipart/form-data")
        assert response.status_code == 202, response.get_json()
        return uuid.UUID(response.get_json()["id"])

    def finished(self, job_id: uuid.UUID) -> Job:
        def done() -> Job | None:
            with self.sessions() as session:
                job = session.get(Job, job_id)
                return job if job is not None and job.finished_at is not None else None

        # Polled gently: the bench must not take the CPU the worker runs on (the figures
        # come from the row's own timestamps, not from when this loop notices).
        job = wait(done, 600, f"job {job_id}", every=0.25)
        assert job.status == "succeeded", (job.status, job.error_message)
        return job  # type: ignore[no-any-return]

    def close(self) -> None:
        self.app.extensions["stylequeue"]["engine"].dispose()
        stop(self.workers)
        self.redis_process.terminate()
        self.redis_process.wait(10)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overhead(service: Service, images: Path | None, repeats: int) -> dict[str, float]:
    """The same job run bare, through the queue, and bare again, ``repeats`` times.

    Besides the two totals: the time outside the engine (from the row's ``created_at`` and
    ``finished_at`` and the engine's own clock, ``elapsed``, which the worker stores), the
    engine's own time in the worker against the bare engine's, and an A/A control: the bare
    run against the bare run just after it, the noise floor of this machine for this job.
    """
    from shared.presets import presets
    from worker.engine import Iterate, stylize

    content = sample_pair(images)[0]
    content.thumbnail((256, 256))
    style = Image.open(presets()["starry-night"].path).convert("RGB")
    options = {"size": 128, "iterations": 100, "scales": 1, "seed": 1, "backbone": "vgg19-random"}
    photo = png(content)

    def bare() -> tuple[float, float]:
        """Seconds for the whole call, and the engine's own clock at its last iteration."""
        last: list[Iterate] = []
        begin = time.perf_counter()
        stylize(content=content, styles=[style], progress=last.append, **options)  # type: ignore[arg-type]
        return time.perf_counter() - begin, last[-1].elapsed

    stylize(content=content, styles=[style], **{**options, "iterations": 3})  # warm up
    runs = []
    for _ in range(repeats):
        first, first_engine = bare()
        job = service.finished(
            service.submit(photo, **{k: str(v) for k, v in options.items()}, reuse="false")
        )
        again, _ = bare()
        assert job.finished_at is not None and job.elapsed is not None
        queued = (job.finished_at - job.created_at).total_seconds()
        runs.append((first, queued, again, queued - job.elapsed, job.elapsed / first_engine))
    first, queued, again, outside, engine_ratio = np.asarray(runs).T
    control = again / first
    # Each queued run against the mean of the bare runs on either side of it.
    ratios = (queued / ((first + again) / 2)).tolist()
    ratio_low, ratio_high = median_interval(ratios)
    engine_low, engine_high = median_interval(engine_ratio.tolist())
    return {
        "ratio": float(np.median(ratios)),
        "ratio_low": ratio_low,
        "ratio_high": ratio_high,
        "control": float(np.median(control)),
        "control_low": float(control.min()),
        "control_high": float(control.max()),
        "outside": float(np.median(outside / queued)),
        "outside_ms": float(np.median(outside) * 1000),
        "engine_ratio": float(np.median(engine_ratio)),
        "engine_low": engine_low,
        "engine_high": engine_high,
    }


def against_goal(low: float, high: float, goal: float) -> str:
    """Met only when the whole confidence interval is within the goal: this machine's
    noise is larger than the 2 % the goal allows, so a median alone could pass by luck."""
    if high <= goal:
        return "met"
    if low > goal:
        return "not met"
    return "not resolved: the interval holds the goal"


def percent(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f} %"


def latency(service: Service, jobs: int) -> dict[str, Any]:
    photo = png(Image.effect_noise((48, 36), 64).convert("RGB"))
    delays = []
    for _ in range(jobs):
        job = service.finished(service.submit(photo, size="32", iterations="1"))
        assert job.started_at is not None
        delays.append((job.started_at - job.created_at).total_seconds() * 1000)
    celery = service.app.extensions["stylequeue"]["celery"]
    pings = []
    for _ in range(jobs):
        key = f"stylequeue:ping:{uuid.uuid4().hex}"
        sent = time.time()
        celery.send_task(broker.PING_TASK, args=[key], queue=service.settings.queue)
        started = float(wait(lambda key=key: service.redis.get(key), 30, "the ping", every=0.01))
        pings.append((started - sent) * 1000)
    return {"job_ms": delays, "ping_ms": pings}


def streaming(settings: Settings, points: int) -> float:
    """Points per second a reporter writes, fed as fast as it takes them."""
    from worker.engine import Iterate
    from worker.reporting import JobReporter

    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    photo = png(Image.effect_noise((64, 48), 64).convert("RGB"))
    uploads = [Upload("content", "p.png", photo), Upload("style", "s.png", photo)]
    request = parse_request({"iterations": ["5000"], "size": ["32"]}, uploads, settings)
    storage = storage_from_settings(settings)
    with sessions.begin() as session:
        job_id = create_job(session, storage, request).id
    reporter = JobReporter(job_id, sessions, storage, broker.connect(settings.redis_url), 0.5)
    begin = time.perf_counter()
    for iteration in range(1, points + 1):
        reporter.progress(
            Iterate(iteration=iteration, total=points, scale=0, scales=1, loss=1.0, content=0.5,
                    style=0.5, tv=0.0, elapsed=time.perf_counter() - begin)
        )  # fmt: skip
    reporter.close()
    assert reporter.flush()  # everything written: the rate counts the writing
    elapsed = time.perf_counter() - begin
    engine.dispose()
    return points / elapsed


def histogram(delays: list[float], pings: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    top = max(percentile(delays, 99.5), percentile(pings, 99.5)) * 1.1
    bins = np.linspace(0, top, 60)
    axis.hist(delays, bins=bins, alpha=0.7, label="job: created_at → started_at")
    axis.hist(pings, bins=bins, alpha=0.7, label="bare Celery task: send → start")
    axis.set(xlabel="milliseconds", ylabel="count", title="Queue latency, idle warm worker")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help=IMAGES_HELP)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--stream-points", type=int, default=20000)
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    service = Service(scratch, args.database_url)
    try:
        cost = overhead(service, args.images, args.repeats)
        print(f"overhead: {100 * (cost['ratio'] - 1):+.1f} %", flush=True)
        waits = latency(service, args.latency_jobs)
        print(f"latency p50 {percentile(waits['job_ms'], 50):.1f} ms", flush=True)
        rate = streaming(service.settings, args.stream_points)
        print(f"streaming {rate:.0f} points/s", flush=True)
    finally:
        service.close()
    database = "PostgreSQL" if args.database_url else "SQLite"
    ratio = cost["ratio"]
    job_ms, ping_ms = waits["job_ms"], waits["ping_ms"]
    lines = [
        f"## The job system around the engine ({database}, one run)",
        "",
        f"`python bench/service.py` on {machine()}, "
        f"{datetime.now():%Y-%m-%d}; one warm worker, the app in the bench's process.",
        "",
        "| figure | measured | goal | |",
        "|---|---|---|---|",
        f"| the same job (128 px, 100 iterations) through the queue vs the bare engine, "
        f"median of {args.repeats} ratios to the bare runs before and after "
        f"(95 % confidence interval) | {percent(ratio)} ({percent(cost['ratio_low'])} to "
        f"{percent(cost['ratio_high'])}) | ≤ +2 % "
        f"| {against_goal(cost['ratio_low'], cost['ratio_high'], 1.02)} |",
        f"| A/A control: the bare engine against itself, run after the queued job | "
        f"{100 * (cost['control'] - 1):+.1f} % (from {100 * (cost['control_low'] - 1):+.0f} "
        f"to {100 * (cost['control_high'] - 1):+.0f} %) | (noise floor) | |",
        f"| the job's time outside the engine (queue, claim, inputs, result, bookkeeping) | "
        f"{cost['outside_ms']:.0f} ms, {100 * cost['outside']:.1f} % of the job | "
        "(part of the 2 %) | |",
        f"| the engine's own time in the worker vs the bare engine's, median (95 % "
        f"confidence interval) | {percent(cost['engine_ratio'])} "
        f"({percent(cost['engine_low'])} to {percent(cost['engine_high'])}) | | |",
        f"| queue latency p50, `created_at` → `started_at` ({len(job_ms)} jobs) | "
        f"{percentile(job_ms, 50):.1f} ms | ≤ 25 ms | "
        f"{'met' if percentile(job_ms, 50) <= 25 else 'not met'} |",
        f"| queue latency p99 | {percentile(job_ms, 99):.1f} ms | ≤ 100 ms | "
        f"{'met' if percentile(job_ms, 99) <= 100 else 'not met'} |",
        f"| bare Celery task, send → start, p50 / p99 | {percentile(ping_ms, 50):.1f} / "
        f"{percentile(ping_ms, 99):.1f} ms | (reference) | |",
        f"| loss points a worker's reporter writes per second | {rate:,.0f} | ≥ 100 "
        f"(100 iterations/s) | {'met' if rate >= 100 else 'not met'} |",
        "",
        "![queue latency histogram](queue-latency.png)",
    ]
    print("\n".join(lines))
    if args.update:
        histogram(job_ms, ping_ms, args.update.parent / "queue-latency.png")
        update_section(args.update, "service", lines)


if __name__ == "__main__":
    main()
