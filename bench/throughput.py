"""Job throughput of the service: what the queue and the database sustain on small jobs.

Not a test. Starts its own redis-server, a fresh database (SQLite, or ``--database-url``),
N real worker processes (``stylequeue worker``) and the Flask app in this process; submits
``--jobs`` tiny jobs (32 px, 5 iterations, so the engine's share is small) through the API
at once and waits for all of them. For N = 1, 2 and 4 workers, side by side in one run:

* jobs per minute, first submission to last finish;
* per job, from the job rows: engine seconds (the run's own clock), worker-side overhead
  (``finished_at - started_at`` minus the engine: claim, inputs, result, bookkeeping), and,
  with one worker, the gap between one job's end and the next one's start (the broker's
  dispatch).

Every worker runs torch on one thread (``OMP_NUM_THREADS=1``) so that worker counts are
compared on the same footing on a small machine; the cores this machine has bound the
figures at N > cores. Workers run one job at a time (``batch_jobs = 1``): this bench is
about the queue and the database; ``bench/batching.py`` measures batching.

Usage: ``python bench/throughput.py [--jobs 40] [--workers 1,2,4] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import itertools
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from PIL import Image
from report import (  # bench/report.py (run as a script)
    bench_settings,
    machine,
    start_workers,
    stop,
    update_section,
    wait,
)

from shared.db import make_engine, make_sessionmaker
from shared.models import Job
from stylequeue.service import start_embedded_redis
from web import create_app

ROOT = Path(__file__).resolve().parents[1]


def photo_bytes() -> bytes:
    image = Image.effect_noise((96, 72), 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def run(workers: int, jobs: int, database_url: str | None, scratch: Path) -> dict[str, float]:
    base = scratch / f"n{workers}"
    base.mkdir()
    redis_process, redis_url = start_embedded_redis(base)
    settings = bench_settings(
        base, redis_url, database_url, preview_every=0, checkpoint_every=0, batch_jobs=1
    )
    processes = []
    try:
        processes = start_workers(settings, workers, base, OMP_NUM_THREADS="1")
        app = create_app({"SETTINGS": settings})
        web = app.test_client()
        photo = photo_bytes()
        started = time.perf_counter()
        ids = []
        for _ in range(jobs):
            response = web.post(
                "/api/jobs",
                data={"content": (io.BytesIO(photo), "p.png"), "style_preset": "starry-night",
                      "backbone": "vgg19-random", "size": "32", "iterations": "5",
                      "scales": "1"},
                content_type="multipart/form-data",
            )  # fmt: skip
            assert response.status_code == 202, response.get_json()
            ids.append(uuid.UUID(response.get_json()["id"]))
        sessions = make_sessionmaker(make_engine(settings.database_url))

        def all_done() -> bool:
            with sessions() as session:
                done = [session.get(Job, job_id) for job_id in ids]
                return all(job is not None and job.finished_at for job in done)

        wait(all_done, 1800, "the jobs")
        wall = time.perf_counter() - started
        with sessions() as session:
            rows = [session.get(Job, job_id) for job_id in ids]
            assert all(job is not None and job.status == "succeeded" for job in rows)
            finished = sorted((job for job in rows if job), key=lambda job: job.started_at)
            engine = [job.elapsed or 0.0 for job in finished]
            worker_side = [
                seconds(job.started_at, job.finished_at) - (job.elapsed or 0.0) for job in finished
            ]
            gaps = [
                seconds(before.finished_at, after.started_at)
                for before, after in itertools.pairwise(finished)
            ]
        app.extensions["stylequeue"]["engine"].dispose()
        return {
            "workers": workers,
            "jobs_per_minute": jobs / wall * 60,
            "engine_ms": statistics.mean(engine) * 1000,
            "worker_overhead_ms": statistics.median(worker_side) * 1000,
            "dispatch_gap_ms": statistics.median(gaps) * 1000 if workers == 1 else float("nan"),
        }
    finally:
        stop(processes)
        redis_process.terminate()
        redis_process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--database-url", help="default: a fresh SQLite file per run")
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    try:
        results = [
            run(int(n), args.jobs, args.database_url, scratch) for n in args.workers.split(",")
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    database = "PostgreSQL" if args.database_url else "SQLite"
    lines = [
        f"## Job throughput ({args.jobs} small jobs, {database}, one run)",
        "",
        f"`python bench/throughput.py` on {machine()}, "
        f"{datetime.now():%Y-%m-%d}: 32 px, 5 iterations, one torch thread per worker.",
        "",
        "| workers | jobs / min | vs 1 worker | engine per job | worker-side overhead per job "
        "| dispatch gap (1 worker) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        gap = result["dispatch_gap_ms"]
        lines.append(
            f"| {result['workers']} | {result['jobs_per_minute']:.0f} | "
            f"{result['jobs_per_minute'] / results[0]['jobs_per_minute']:.2f}× | "
            f"{result['engine_ms']:.0f} ms | {result['worker_overhead_ms']:.0f} ms | "
            + ("–" if gap != gap else f"{gap:.1f} ms")
            + " |"
        )
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "throughput", lines)


if __name__ == "__main__":
    main()
