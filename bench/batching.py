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
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from engine import IMAGES_HELP, sample_pair  # bench/engine.py (run as a script)
from report import machine, update_section  # bench/report.py (run as a script)
from service import Service, png  # bench/service.py

from shared.presets import presets

ROOT = Path(__file__).resolve().parents[1]


def run_jobs(
    service: Service, photo: bytes, size: int, iterations: int, jobs: int
) -> dict[str, float]:
    """Submit ``jobs`` jobs at once; jobs per minute until the last finished, and the mean
    job's time from ``created_at`` to ``finished_at``."""
    names = list(presets())
    started = time.perf_counter()
    ids = [
        service.submit(photo, style_preset=names[index % 4], size=str(size),
                       iterations=str(iterations), seed=str(index), reuse="false")
        for index in range(jobs)
    ]  # fmt: skip
    finished = [service.finished(job_id) for job_id in ids]  # each asserts it succeeded
    wall = time.perf_counter() - started
    waits = [
        (job.finished_at - job.created_at).total_seconds() for job in finished if job.finished_at
    ]
    return {"jobs_per_minute": jobs / wall * 60, "mean_wait": statistics.mean(waits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help=IMAGES_HELP)
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
    content = sample_pair(args.images)[0]
    content.thumbnail((1024, 1024))
    photo = png(content)
    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    services = {}
    for mode, batch_jobs in (("off", 1), ("on", args.batch_jobs)):
        (scratch / mode).mkdir()
        services[mode] = Service(
            scratch / mode, None, batch_jobs=batch_jobs, batch_max_size=max(sizes)
        )
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            # About the same work per job at every size: fewer iterations for larger images.
            iterations = max(5, round(args.work / (size * size * 3 / 4)))
            for round_index in range(args.rounds):
                order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
                measured = {
                    m: run_jobs(services[m], photo, size, iterations, args.jobs) for m in order
                }
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
