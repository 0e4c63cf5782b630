"""API throughput: status polls per second and their latency under concurrent clients,
against the production server (gunicorn with the repository's gunicorn.conf.py, as the
Dockerfile runs it) on loopback.

Not a test. Starts its own redis-server, a fresh database (SQLite, or ``--database-url``),
one worker to finish one small job (then stops it, so that every poll reads the same
rows), and gunicorn; then, in each of ``--rounds`` rounds, ``wrk`` (Debian's package) opens
``--clients`` connections for ``--seconds`` seconds on ``GET /api/jobs/<id>`` of the
finished job, then as long on a queued job's (whose answer counts its queue position),
then on ``GET /healthz`` (Flask and gunicorn with none of our code: the floor). The API's
rate limit stays in the path (web/ratelimit.py: its counts go to Redis in batches) with a
limit none reaches.
wrk's clients poll again as soon as they are answered, so its rounds measure the most the
server answers, and a latency that Little's law ties to that rate (clients / rate). Each
round then also polls at fixed rates (``--paced-rates``, the goal's 1,000 per second first)
from as many clients, timed from when each poll was due (bench/paced.py): the latency a
service that has that load to answer gives; then ``GET /healthz`` at the first of those
rates, the floor that the client, gunicorn, Flask and the machine set on that tail.
Each round also counts wrk's connections on each gunicorn process: the latency of a
process's connections grows with their number. A last round polls while ``--streams``
event streams (open job pages, more than the server's threads) are held open on a queued
job: how many were served, refused (503 ``streams_busy``) or left waiting for a thread, and
what the polls got meanwhile.

Usage: ``python bench/api.py [--clients 50] [--seconds 10] [--rounds 3] [--threads T]
[--paced-rates 1000,1500] [--streams 40] [--event-streams N] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import io
import os
import re
import runpy
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from paced import PacedRun, paced  # bench/paced.py
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
    #: Requests wrk gave up on after its 2 s timeout.
    timeouts: int
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
    timeouts = re.search(r"Socket errors:.*timeout (\d+)", out)
    return WrkRun(
        rate,
        percentiles,
        int(errors.group(1)) if errors else 0,
        int(timeouts.group(1)) if timeouts else 0,
        connections,
    )


def at_rate(
    port: int, path: str, rate: int, args: argparse.Namespace, split: Callable[[], list[int]]
) -> tuple[PacedRun, list[int]]:
    """A fixed-rate run (bench/paced.py), with ``split()`` taken halfway through."""
    runs: list[PacedRun] = []
    thread = threading.Thread(
        target=lambda: runs.append(
            paced("127.0.0.1", port, path, rate=rate, clients=args.clients, seconds=args.seconds)
        )
    )
    thread.start()
    time.sleep(args.seconds / 2)
    connections = split()
    thread.join()
    return runs[0], connections


def hold_streams(port: int, path: str, count: int) -> tuple[list[socket.socket], Counter[str]]:
    """``count`` connections asking for the event stream at ``path``, left open; how each
    was answered within 5 s: ``served``, ``refused`` (503) or ``waiting`` (no thread)."""
    held, answers = [], Counter[str]()
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.append(client)
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        try:
            head = client.recv(64)
        except TimeoutError:
            answers["waiting"] += 1
            continue
        answers["served" if head.startswith(b"HTTP/1.1 200") else "refused"] += 1
    return held, answers


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
    parser.add_argument(
        "--paced-rates",
        default="1000,1500",
        help="fixed poll rates per second, each polled for --seconds in every round",
    )
    parser.add_argument(
        "--streams", type=int, default=40, help="event streams held open in the last round"
    )
    parser.add_argument(
        "--event-streams", type=int, help="STYLEQUEUE_EVENT_STREAMS (default: the setting's)"
    )
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        paced_rates = [int(rate) for rate in args.paced_rates.split(",") if rate]
    except ValueError:
        parser.error(f"--paced-rates takes whole numbers: {args.paced_rates!r}")
    if shutil.which("wrk") is None:
        raise SystemExit("bench/api.py needs wrk: apt install wrk")

    scratch = Path(tempfile.mkdtemp(prefix="stylequeue-bench-"))
    redis_process, redis_url = start_embedded_redis(scratch)
    settings = bench_settings(
        scratch,
        redis_url,
        args.database_url,
        rate_limit_per_minute=10**9,
        **({} if args.event_streams is None else {"event_streams": args.event_streams}),
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
    queued_polls: list[WrkRun] = []
    floors: list[WrkRun] = []
    at_rates: dict[int, list[tuple[PacedRun, list[int]]]] = {rate: [] for rate in paced_rates}
    # /healthz at the first fixed rate: the same client, server and machine without our
    # code, so that a poll's tail can be told apart from the machine's.
    floors_at_rate: list[PacedRun] = []
    held: list[socket.socket] = []
    streams: Counter[str] = Counter()
    loaded: WrkRun | None = None
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

        def submit() -> dict[str, Any]:
            return requests.post(  # type: ignore[no-any-return]
                base + "/api/jobs",
                files={"content": ("p.png", photo.getvalue())},
                data={"style_preset": "starry-night", "backbone": "vgg19-random", "size": "32",
                      "iterations": "2", "scales": "1", "reuse": "false"},
                timeout=30,
            ).json()  # fmt: skip

        job = submit()
        url = base + job["links"]["self"]
        wait(
            lambda: requests.get(url, timeout=5).json()["status"] == "succeeded",
            120,
            "the job",
            tolerate=(requests.RequestException,),
        )
        worker.terminate()
        worker.wait(30)
        # No worker runs any more: this job stays queued (its polls count its queue
        # position too), and its event streams stay open.
        queued = submit()
        queued_url = base + queued["links"]["self"]

        def split() -> list[int]:
            return connections_per_worker(master, port)

        wrk(url, args.clients, 2, split)  # warm-up: connections, caches
        for _ in range(args.rounds):
            polls.append(wrk(url, args.clients, args.seconds, split))
            queued_polls.append(wrk(queued_url, args.clients, args.seconds, split))
            floors.append(wrk(base + "/healthz", args.clients, args.seconds, split))
            for rate, runs in at_rates.items():
                runs.append(at_rate(port, job["links"]["self"], rate, args, split))
            if paced_rates:
                floors_at_rate.append(at_rate(port, "/healthz", paced_rates[0], args, split)[0])
        if args.streams:
            held, streams = hold_streams(port, queued["links"]["events"], args.streams)
            loaded = wrk(url, args.clients, args.seconds, split)
    finally:
        for client in held:
            client.close()
        stop(processes)
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)

    database = "PostgreSQL" if args.database_url else "SQLite"
    rates = [run.rate for run in polls]
    p99s = [run.latency.get("99", float("nan")) for run in polls]
    rate, p99 = statistics.median(rates), statistics.median(p99s)
    errors = sum(run.errors for run in polls + queued_polls)
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
        "cores), `GET /api/jobs/<id>` of a finished job, then of a queued job, then "
        "`GET /healthz`, as long each, "
        f"alternating, {args.rounds} round{'s' if args.rounds > 1 else ''}; in each round "
        f"then, polls at fixed rates from {args.clients} clients, timed from when each was "
        "due (`bench/paced.py`).",
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
        f"| errors (non-2xx, both jobs' polls) | {errors} | 0 "
        f"| {'met' if errors == 0 else 'not met'} |",
        "| polls of a queued job (its queue position counted too): per second; p50 / p99 | "
        + median_and_each([run.rate for run in queued_polls], "{:,.0f}")
        + "; "
        + median_and_each([run.latency.get("50", 0) for run in queued_polls], "{:.1f}")
        + " / "
        + median_and_each([run.latency.get("99", 0) for run in queued_polls], "{:.1f}")
        + " ms | | |",
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
    for rate, rounds_at_rate in at_rates.items():
        runs = [run for run, _ in rounds_at_rate]
        at_p99 = statistics.median(run.latency["99"] for run in runs)
        failed = sum(run.errors for run in runs)
        lines.append(
            f"| at a fixed {rate:,} polls/s: answered per second; latency p50 / p90 / p99 "
            "from when each poll was due; errors (unanswered at the end included); the "
            "connections on each process | "
            + median_and_each([run.answered_rate for run in runs], "{:,.0f}")
            + "; "
            + " / ".join(
                median_and_each([run.latency[p] for run in runs], "{:.1f}")
                for p in ("50", "90", "99")
            )
            + f" ms; {failed}; "
            + ", ".join("/".join(map(str, connections)) for _, connections in rounds_at_rate)
            + " | "
            + (
                f"p99 ≤ 50 ms | {'met' if at_p99 <= 50 and not failed else 'not met'} |"
                if rate == 1000
                else "| |"
            )
        )
    if floors_at_rate:
        lines.append(
            f"| at a fixed {paced_rates[0]:,} requests/s, `GET /healthz` (the same client, "
            "server and machine without our code): latency p50 / p90 / p99 | "
            + " / ".join(
                median_and_each([run.latency[p] for run in floors_at_rate], "{:.1f}")
                for p in ("50", "90", "99")
            )
            + " ms | | |"
        )
    if loaded is not None:
        answered = loaded.rate > 0 and loaded.latency.get("99", 0) > 0
        polled = f"{loaded.rate:,.0f} polls/s, p99 " + (
            f"{loaded.latency['99']:.1f} ms" if answered else "none (no answer)"
        )
        lines.append(
            f"| with {args.streams} event streams held open (job pages; "
            f"`STYLEQUEUE_EVENT_STREAMS={settings.event_streams}` per process): served / "
            f"refused (503) / waiting for a thread; the polls meanwhile | {streams['served']} / "
            f"{streams['refused']} / {streams['waiting']}; {polled}, {loaded.timeouts} timed "
            f"out (2 s) | ≥ 1,000 polls/s, none timed out | "
            f"{'met' if answered and loaded.rate >= 1000 and not loaded.timeouts else 'not met'} |"
        )
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "api", lines)


if __name__ == "__main__":
    main()
