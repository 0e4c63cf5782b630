"""API throughput: status polls per second and their latency under concurrent clients,
against the production server (gunicorn, as in the Dockerfile) on loopback.

Not a test. Starts its own redis-server, a fresh database (SQLite, or ``--database-url``),
one worker to finish one small job (then stops it: the poll is of a finished job, the
common case), and gunicorn; then ``wrk`` (Debian's package) opens ``--clients``
connections for ``--seconds`` seconds, bounded, on ``GET /api/jobs/<id>``. The API's rate
limit stays in the path (one Redis round trip per request) with a limit no test reaches.

Usage: ``python bench/api.py [--clients 50] [--seconds 10] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import requests
from PIL import Image
from report import (  # bench/report.py (run as a script)
    bench_settings,
    start_workers,
    stop,
    update_section,
    wait,
)

from stylequeue.service import free_port, start_embedded_redis

ROOT = Path(__file__).resolve().parents[1]


def wrk(url: str, clients: int, seconds: int) -> tuple[float, dict[str, float], int]:
    """Requests per second, latency percentiles (ms) and non-2xx answers."""
    done = subprocess.run(
        ["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    percentiles = {
        p: float(v) * units[u]
        for p, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    }
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, percentiles, int(errors.group(1)) if errors else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--gunicorn-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()
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
    env = {**os.environ, **settings.environ()}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    processes = []
    try:
        (worker,) = start_workers(settings, 1, scratch)
        processes.append(worker)
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class",
             "gthread", "--workers", str(args.gunicorn_workers), "--threads", str(args.threads),
             "--log-level", "warning", "web:create_app()"],
            env=env, cwd=ROOT,
        )  # fmt: skip
        processes.append(web)
        wait(
            lambda: requests.get(base + "/healthz", timeout=1).ok,
            60,
            "gunicorn",
            tolerate=(requests.RequestException,),
        )
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
        wrk(url, args.clients, 2)  # warm-up: connections, caches
        rate, latency, errors = wrk(url, args.clients, args.seconds)
    finally:
        stop(processes)
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)

    database = "PostgreSQL" if args.database_url else "SQLite"
    p99 = latency.get("99", float("nan"))
    lines = [
        f"## API: status polls under {args.clients} concurrent clients ({database}, one run)",
        "",
        f"`python bench/api.py` on {platform.machine()}, {os.cpu_count()} cores, "
        f"{datetime.now():%Y-%m-%d}: gunicorn, {args.gunicorn_workers} gthread workers × "
        f"{args.threads} threads, `wrk -c {args.clients}` for {args.seconds} s on loopback "
        "(wrk shares the machine's cores), `GET /api/jobs/<id>` of a finished job.",
        "",
        "| figure | measured | goal | |",
        "|---|---|---|---|",
        f"| polls per second | {rate:,.0f} | ≥ 1,000 | {'met' if rate >= 1000 else 'not met'} |",
        f"| latency p50 / p90 | {latency.get('50', 0):.1f} / {latency.get('90', 0):.1f} ms | | |",
        f"| latency p99 | {p99:.1f} ms | ≤ 50 ms | {'met' if p99 <= 50 else 'not met'} |",
        f"| errors (non-2xx) | {errors} | 0 | {'met' if errors == 0 else 'not met'} |",
    ]
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "api", lines)


if __name__ == "__main__":
    main()
