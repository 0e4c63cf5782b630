"""API throughput: status polls per second and their latency under concurrent clients,
against the production server (gunicorn with the repository's gunicorn.conf.py, as the
Dockerfile runs it) on loopback.

Not a test. Starts its own redis-server, a fresh database (SQLite, or ``--database-url``),
one worker to finish one small job (then stops it, so that every poll reads the same
rows), and gunicorn; then, in each of ``--rounds`` rounds, ``wrk`` (Debian's package) opens
``--clients`` connections for ``--seconds`` seconds on ``GET /api/jobs/<id>``, then as
long on ``GET /healthz`` (Flask and gunicorn with none of our code: the floor). The API's
rate limit stays in the path (one Redis round trip per poll) with a limit none reaches.
Each round also counts wrk's connections on each gunicorn process: the latency of a
process's connections grows with their number.

Usage: ``python bench/api.py [--clients 50] [--seconds 10] [--rounds 3] [--threads T]
[--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import requests
from PIL import Image
from report import (  # bench/report.py (run as a script)
    bench_settings,
    machine,
    start_workers,
    stop,
    update_section,
    wait,
)

from stylequeue.service import free_port, start_embedded_redis

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WrkRun:
    rate: float
    #: Latency percentiles in ms: "50", "75", "90", "99".
    latency: dict[str, float]
    errors: int
    #: wrk's connections on each gunicorn worker process, mid-run.
    split: list[int]


def wrk(url: str, clients: int, seconds: int, split: Callable[[], list[int]]) -> WrkRun:
    """One wrk run on ``url``: requests per second, latency percentiles (ms), non-2xx
    answers, and ``split()`` taken halfway through."""
    run = subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds}s", "--latency", url],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(seconds / 2)
        connections = split()
        out, _ = run.communicate(timeout=seconds + 60)
    finally:
        if run.poll() is None:
            run.kill()
    if run.returncode:
        raise SystemExit(f"wrk failed: {out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    percentiles = {
        p: float(v) * units[u]
        for p, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return WrkRun(rate, percentiles, int(errors.group(1)) if errors else 0, connections)


def connections_per_worker(master: psutil.Process, port: int) -> list[int]:
    return sorted(
        (
            sum(
                1
                for c in worker.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
            )
            for worker in master.children()
        ),
        reverse=True,
    )


def median_and_each(values: list[float], form: str) -> str:
    each = ", ".join(form.format(v) for v in values)
    return f"{form.format(statistics.median(values))} ({each})" if len(values) > 1 else each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gunicorn-workers", type=int, help="default: gunicorn.conf.py's")
    parser.add_argument("--threads", type=int, help="default: gunicorn.conf.py's")
    parser.add_argument("--worker-class", help="default: gunicorn.conf.py's")
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        raise SystemExit("bench/api.py needs wrk: apt install wrk")

    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    redis_process, redis_url = start_embedded_redis(scratch)
    settings = bench_settings(
        scratch,
        redis_url,
        args.database_url,
        rate_limit_per_minute=10**9,
    )
    production = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    workers = args.gunicorn_workers or production["workers"]
    threads = args.threads or production["threads"]
    worker_class = args.worker_class or production["worker_class"]
    port = free_port()
    flags = (
        f"--bind 127.0.0.1:{port} --workers {workers} --threads {threads} "
        f"--worker-class {worker_class} --log-level warning"
    )
    env = {**os.environ, **settings.environ(), "GUNICORN_CMD_ARGS": flags}
    base = f"http://127.0.0.1:{port}"
    processes = []
    polls: list[WrkRun] = []
    floors: list[WrkRun] = []
    try:
        (worker,) = start_workers(settings, 1, scratch)
        processes.append(worker)
        # Plain `gunicorn` in the repository's root reads its gunicorn.conf.py.
        web = subprocess.Popen([sys.executable, "-m", "gunicorn"], env=env, cwd=ROOT)
        processes.append(web)
        wait(
            lambda: requests.get(base + "/healthz", timeout=1).ok,
            60,
            "gunicorn",
            tolerate=(requests.RequestException,),
        )
        master = psutil.Process(web.pid)
        photo = io.BytesIO()
        Image.effect_noise((48, 36), 64).convert("RGB").save(photo, format="PNG")
        job = requests.post(
            base + "/api/jobs",
            files={"content": ("p.png", photo.getvalue())},
            data={"style_preset": "starry-night", "backbone": "vgg19-random", "size": "32",
                  "iterations": "2", "scales": "1"},
            timeout=30,
        ).json()  # fmt: skip
        url = base + job["links"]["self"]
        wait(
            lambda: requests.get(url, timeout=5).json()["status"] == "succeeded",
            120,
            "the job",
            tolerate=(requests.RequestException,),
        )
        worker.terminate()
        worker.wait(30)

        def split() -> list[int]:
            return connections_per_worker(master, port)

        wrk(url, args.clients, 2, split)  # warm-up: connections, caches
        for _ in range(args.rounds):
            polls.append(wrk(url, args.clients, args.seconds, split))
            floors.append(wrk(base + "/healthz", args.clients, args.seconds, split))
    finally:
        stop(processes)
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)

    database = "PostgreSQL" if args.database_url else "SQLite"
    rates = [run.rate for run in polls]
    p99s = [run.latency.get("99", float("nan")) for run in polls]
    rate, p99 = statistics.median(rates), statistics.median(p99s)
    errors = sum(run.errors for run in polls)
    floor_rates = [run.rate for run in floors]
    rounds = f"median of {args.rounds} rounds (each)" if args.rounds > 1 else "one round"
    lines = [
        f"## API: status polls under {args.clients} concurrent clients ({database})",
        "",
        f"`python bench/api.py` on {machine()}, "
        f"{datetime.now():%Y-%m-%d}: gunicorn with `gunicorn.conf.py`, "
        f"{workers} {worker_class} workers"
        + (f" × {threads} threads" if worker_class == "gthread" else "")
        + ", a socket each; "
        f"`wrk -c {args.clients}` for {args.seconds} s on loopback (wrk shares the machine's "
        "cores), `GET /api/jobs/<id>` of a finished job, then `GET /healthz` as long, "
        f"alternating, {args.rounds} round{'s' if args.rounds > 1 else ''}.",
        "",
        f"| figure | {rounds} | goal | |",
        "|---|---|---|---|",
        f"| polls per second | {median_and_each(rates, '{:,.0f}')} | ≥ 1,000 "
        f"| {'met' if rate >= 1000 else 'not met'} |",
        "| latency p50 / p90 | "
        + median_and_each([run.latency.get("50", 0) for run in polls], "{:.1f}")
        + " / "
        + median_and_each([run.latency.get("90", 0) for run in polls], "{:.1f}")
        + " ms | | |",
        f"| latency p99 | {median_and_each(p99s, '{:.1f}')} ms | ≤ 50 ms "
        f"| {'met' if p99 <= 50 else 'not met'} |",
        f"| errors (non-2xx) | {errors} | 0 | {'met' if errors == 0 else 'not met'} |",
        "| wrk's connections on each gunicorn process, mid-run | "
        + ", ".join("/".join(map(str, run.split)) for run in polls)
        + " | | |",
        f"| `GET /healthz` per second (Flask and gunicorn alone) | "
        f"{median_and_each(floor_rates, '{:,.0f}')} | | |",
        "| `GET /healthz` latency p50 / p99 | "
        + median_and_each([run.latency.get("50", 0) for run in floors], "{:.1f}")
        + " / "
        + median_and_each([run.latency.get("99", 0) for run in floors], "{:.1f}")
        + " ms | | |",
        f"| a poll's cost in `/healthz` requests (rate ratio, median) "
        f"| {statistics.median(f / r for f, r in zip(floor_rates, rates, strict=True)):.2f} | | |",
    ]
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "api", lines)


if __name__ == "__main__":
    main()
