"""Worker batching: the same queued jobs through one worker, batching off and on.

Not a test. Starts two small services side by side (each its own redis-server, SQLite file
and one real ``stylequeue worker``): one with ``batch_jobs = 1`` (off), one with
``--batch-jobs`` (on, ``batch_max_size`` raised to the largest size measured, so that the
sizes it leaves alone by default are measured too). For each size, ``--jobs`` jobs (the
four style presets in turn, one seed each, one scale) are submitted at once to one
service, then to the other, alternating for ``--rounds``:

* jobs per minute, from the first submission to the last finish;
* the mean job's time from ``created_at`` to ``finished_at`` (what a user waits);
* the speed-up, on against off, of each round's pair.

Usage: ``python bench/batching.py [--sizes 128,256,512] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

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
from shared.presets import presets
from stylequeue.service import start_embedded_redis
from web import create_app

ROOT = Path(__file__).resolve().parents[1]


class Service:
    """redis-server, a SQLite file, one worker and the app, with one batching setting."""

    def __init__(self, base: Path, batch_jobs: int, batch_max_size: int) -> None:
        base.mkdir()
        self.redis_process, redis_url = start_embedded_redis(base)
        self.settings = bench_settings(
            base, redis_url, batch_jobs=batch_jobs, batch_max_size=batch_max_size
        )
        self.workers = start_workers(self.settings, 1, base)
        self.app = create_app({"SETTINGS": self.settings})
        self.client = self.app.test_client()
        self.sessions = make_sessionmaker(make_engine(self.settings.database_url))

    def run(self, photo: bytes, size: int, iterations: int, jobs: int) -> dict[str, float]:
        names = list(presets())
        started = time.perf_counter()
        ids = []
        for index in range(jobs):
            response = self.client.post(
                "/api/jobs",
                data={"content": (io.BytesIO(photo), "p.png"), "style_preset": names[index % 4],
                      "backbone": "vgg19-random", "size": str(size), "iterations": str(iterations),
                      "scales": "1", "seed": str(index), "reuse": "false"},
                content_type="multipart/form-data",
            )  # fmt: skip
            assert response.status_code == 202, response.get_json()
            ids.append(uuid.UUID(response.get_json()["id"]))

        def finished() -> list[tuple[str, datetime, datetime]] | None:
            with self.sessions() as session:
                jobs = [session.get(Job, job_id) for job_id in ids]
            ended = [
                (job.status, job.created_at, job.finished_at)
                for job in jobs
                if job is not None and job.finished_at is not None
            ]
            return ended if len(ended) == len(ids) else None

        # Polled gently: the bench must not take the CPU the worker runs on.
        ended = wait(finished, 3600, "the jobs", every=0.25)
        wall = time.perf_counter() - started
        assert all(status == "succeeded" for status, _, _ in ended), ended
        waits = [(end - created).total_seconds() for _, created, end in ended]
        return {"jobs_per_minute": jobs / wall * 60, "mean_wait": statistics.mean(waits)}

    def close(self) -> None:
        self.app.extensions["stylequeue"]["engine"].dispose()
        stop(self.workers)
        self.redis_process.terminate()
        self.redis_process.wait(10)


def photo_bytes(images: Path) -> bytes:
    image = Image.open(images / "content" / "tubingen.jpg").convert("RGB")
    image.thumbnail((1024, 1024))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("--sizes", default="128,256,512")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch-jobs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--work", type=float, default=1.5e6, help="pixel-iterations per job (sets iterations)"
    )
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()

    sizes = [int(size) for size in args.sizes.split(",")]
    photo = photo_bytes(args.images)
    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    services = {
        "off": Service(scratch / "off", 1, max(sizes)),
        "on": Service(scratch / "on", args.batch_jobs, max(sizes)),
    }
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            # About the same work per job at every size: fewer iterations for larger images.
            iterations = max(5, round(args.work / (size * size * 3 / 4)))
            for round_index in range(args.rounds):
                order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
                measured = {m: services[m].run(photo, size, iterations, args.jobs) for m in order}
                row = {"size": size, "iterations": iterations, **{
                    f"{m}_{k}": v for m, figures in measured.items() for k, v in figures.items()
                }}  # fmt: skip
                row["speedup"] = row["on_jobs_per_minute"] / row["off_jobs_per_minute"]
                rows.append(row)
                print(row, flush=True)
    finally:
        for service in services.values():
            service.close()
        shutil.rmtree(scratch, ignore_errors=True)

    lines = [
        f"## Worker batching ({args.jobs} jobs at once, one worker, SQLite, one run)",
        "",
        f"`python bench/batching.py` on {machine()}, {datetime.now():%Y-%m-%d}: the same "
        f"jobs through a worker with `batch_jobs = 1` and one with `batch_jobs = "
        f"{args.batch_jobs}`, alternating, {args.rounds} rounds per size.",
        "",
        "| size | iterations | jobs/min off | jobs/min on | throughput on/off | "
        "mean wait off | mean wait on |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} px | {row['iterations']} | {row['off_jobs_per_minute']:.1f} | "
            f"{row['on_jobs_per_minute']:.1f} | {row['speedup']:.2f}× | "
            f"{row['off_mean_wait']:.1f} s | {row['on_mean_wait']:.1f} s |"
        )
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "batching", lines)


if __name__ == "__main__":
    main()
