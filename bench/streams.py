"""Live streams at scale: thousands of open job pages on one web host, with the database
out of the loop.

Not a test. Starts its own redis-server, a fresh PostgreSQL database (``--database-url``'s
server; its statistics count the transactions), gunicorn as gunicorn.conf.py runs it
(gevent workers), and ``--jobs`` queued jobs (no worker: this bench is their worker).
Then, side by side in one run, for each count of open streams in ``0,--streams``:

1. a client process opens that many event streams on loopback, spread evenly over the
   jobs (``GET /api/jobs/<id>/events``, HTTP/1.0, as many as the server accepts), and
   notes every event with the time it arrived;
2. a publisher process does what a worker's reporter does (worker/reporting.py's
   ``JobReporter``, the real one): ``--rate`` loss points a second per job, written to the
   database every ``loss_flush_seconds`` and published to each job's feed after the
   commit, the jobs' flushes spread over the period as independent workers' are; it notes
   when each point was published;
3. meanwhile this process polls a job's status at ``--poll-rate`` a second
   (bench/paced.py, open loop) and reads PostgreSQL's transaction count before and after.

For each count it reports: the streams that received every point of their job once and
in order, the delay from the publish to the client (p50, p99), the loss events the
streams received a second, the database's transactions a second (counted from 11 s after
the streams opened, once their replays are in PostgreSQL's statistics; the publisher's
and the polls' included: the same in every row), the polls' latency, and the cores the web
and the client used.

Usage: ``python bench/streams.py [--streams 1000,5000] [--jobs 50] [--rate 2]
[--seconds 20] [--poll-rate 1000] [--database-url URL] [--update docs/benchmarks.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from paced import PacedRun, paced  # bench/paced.py
from PIL import Image
from report import bench_settings, machine, update_section, wait  # bench/report.py

from stylequeue.service import free_port, start_embedded_redis

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: PostgreSQL's PGSTAT_IDLE_INTERVAL (10 s), and a second more.
STATS_IDLE_SECONDS = 11.0


# --- The client: many streams, every event noted --------------------------------------------


async def _stream(
    port: int, path: str, index: int, got: dict[int, list[tuple[int, float]]], opened: list[int]
) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    status = await reader.readline()
    while (await reader.readline()).strip():
        pass
    if b" 200 " not in status:
        writer.close()
        return
    seen = got.setdefault(index, [])
    buffer, counted = b"", False
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buffer += chunk
        *blocks, buffer = buffer.split(b"\n\n")
        now = time.time()
        for block in blocks:
            if b"event: loss" in block:
                start = block.index(b'"iteration": ') + 13
                seen.append((int(block[start : block.index(b",", start)]), now))
            elif b"event: status" in block and not counted:
                opened[0] += 1  # its replay from the database is under way: open
                counted = True


async def _client(port: int, jobs: list[str], streams: int, ready: Path, out: Path) -> None:
    got: dict[int, list[tuple[int, float]]] = {}
    opened = [0]
    tasks = []
    for index in range(streams):
        path = f"/api/jobs/{jobs[index % len(jobs)]}/events"
        tasks.append(asyncio.create_task(_stream(port, path, index, got, opened)))
        if index % 200 == 199:
            await asyncio.sleep(0.05)  # no more SYNs at once than the backlog takes
    deadline = time.time() + 60
    while opened[0] < streams and time.time() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # the last replays' points, before the measured window
    ready.write_text(str(opened[0]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    out.write_text(json.dumps({"opened": opened[0], "got": got}))


# --- The publisher: a worker's reporter, without the engine ---------------------------------


def _publish(
    settings_file: Path, jobs: list[str], rate: float, seconds: float, start: int, out: Path
) -> None:
    import redis

    from shared import feed
    from shared.config import Settings
    from shared.db import make_engine, make_sessionmaker
    from shared.storage import storage_from_settings
    from worker import reporting
    from worker.engine import Iterate

    settings = Settings.from_env(json.loads(settings_file.read_text()))
    published: dict[str, dict[int, float]] = {job: {} for job in jobs}
    real_publish = feed.publish

    def timed(client: Any, job_id: Any, **fields: Any) -> bool:
        done = real_publish(client, job_id, **fields)
        now = time.time()
        for point in fields.get("points") or []:
            published[str(job_id)][point["iteration"]] = now
        return done

    reporting.feed.publish = timed  # type: ignore[attr-defined]
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    storage = storage_from_settings(settings)
    redis_client = redis.Redis.from_url(settings.redis_url)
    # Each reporter flushes on its own clock from its start. Workers on other machines run
    # their jobs out of step; started together here, all jobs would flush at once, and every
    # stream's event would come in one burst twice a second. So they start spread over one
    # flush period.
    reporters = []
    for job in jobs:
        reporters.append(
            reporting.JobReporter(
                uuid.UUID(job), sessions, storage, redis_client, settings.loss_flush_seconds
            )
        )
        time.sleep(settings.loss_flush_seconds / len(jobs))
    began = time.perf_counter()
    steps = int(seconds * rate)
    for step in range(1, steps + 1):
        due = began + step / rate
        time.sleep(max(0.0, due - time.perf_counter()))
        iteration = start + step
        for reporter in reporters:
            reporter.progress(
                Iterate(
                    iteration=iteration,
                    total=10**6,
                    scale=0,
                    scales=1,
                    loss=1.0 / iteration,
                    content=0.5 / iteration,
                    style=0.5 / iteration,
                    tv=0.0,
                    elapsed=time.perf_counter() - began,
                )
            )
    for reporter in reporters:  # as the worker's run ends: the writer stops, the rest flushed
        reporter.close()
        reporter.flush()
    out.write_text(json.dumps(published))
    engine.dispose()


# --- The run ---------------------------------------------------------------------------------


def _transactions(database_url: str) -> int:
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _fresh_database(server_url: str) -> str:
    import psycopg

    name = f"stylequeue_streams_{uuid.uuid4().hex[:8]}"
    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def _drop_database(url: str, server_url: str) -> None:
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


def _submit_jobs(base: str, count: int) -> list[str]:
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((64, 48)).save(buffer, format="PNG")
    jobs = []
    for _ in range(count):
        response = requests.post(
            base + "/api/jobs",
            data={"style_preset": "starry-night", "backbone": "vgg19-random", "size": "64"},
            files={"content": ("photo.png", buffer.getvalue())},
            timeout=30,
        )
        response.raise_for_status()
        jobs.append(response.json()["id"])
    return jobs


def _cpu_seconds(process: psutil.Process | None) -> float:
    """CPU time of ``process`` and its children so far."""
    if process is None:
        return 0.0
    total = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def _phase(
    args: argparse.Namespace,
    base: Path,
    web: psutil.Process,
    port: int,
    jobs: list[str],
    streams: int,
    start: int,
    database_url: str,
    settings_file: Path,
) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    jobs_file = base / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    client = None
    opened = 0
    if streams:
        ready, out = base / f"ready-{streams}", base / f"client-{streams}.json"
        client = subprocess.Popen(
            [*me, "--client", str(port), str(jobs_file), str(streams), str(ready), str(out)]
        )
        wait(lambda: ready.exists(), 120, "the client's streams")
        opened = int(ready.read_text())
    # PostgreSQL counts a backend's transactions when the backend reports them: at a
    # transaction's end once a second has passed since its last report, else within 10 s of
    # falling idle (PGSTAT_IDLE_INTERVAL). The streams' replays, and before the first row the
    # jobs' submissions, would otherwise be counted in the window below.
    time.sleep(STATS_IDLE_SECONDS)
    published_file = base / f"published-{streams}.json"
    watched = psutil.Process(client.pid) if client is not None else None
    cpu_before = (_cpu_seconds(web), _cpu_seconds(watched))
    before = _transactions(database_url)
    began = time.perf_counter()
    publisher = subprocess.Popen(
        [
            *me,
            "--publish",
            str(settings_file),
            str(jobs_file),
            str(args.rate),
            str(args.seconds),
            str(start),
            str(published_file),
        ]
    )
    polls: list[PacedRun] = []
    job_path = f"/api/jobs/{jobs[0]}"
    poller = threading.Thread(
        target=lambda: polls.append(
            paced(
                "127.0.0.1",
                port,
                job_path,
                rate=args.poll_rate,
                clients=50,
                seconds=max(1.0, args.seconds - 2),
            )
        )
    )
    poller.start()
    publisher.wait()
    poller.join()
    seconds = time.perf_counter() - began
    transactions = _transactions(database_url) - before
    web_cpu = (_cpu_seconds(web) - cpu_before[0]) / seconds
    client_cpu = (_cpu_seconds(watched) - cpu_before[1]) / seconds
    time.sleep(1.0)  # the last flush reaches the clients
    result: dict[str, Any] = {
        "streams": streams,
        "opened": opened,
        "transactions_per_second": transactions / seconds,
        "polls": polls[0].__dict__,
        # Cores busy: the web (gunicorn and its workers), the streams' client.
        "web_cpu": web_cpu,
        "client_cpu": client_cpu,
    }
    published = json.loads(published_file.read_text())
    result["points_per_second"] = sum(len(p) for p in published.values()) / seconds
    if client is not None:
        client.send_signal(signal.SIGTERM)
        client.wait(60)
        got = json.loads((base / f"client-{streams}.json").read_text())["got"]
        complete, delays = 0, []
        for index, seen in got.items():
            job = jobs[int(index) % len(jobs)]
            # The points of the rows before this one come from the database, then these.
            expected = list(range(1, max(int(i) for i in published[job]) + 1))
            iterations = [i for i, _ in seen]
            complete += iterations == expected
            if iterations != expected and "example" not in result:
                result["example"] = {"got": iterations[:40], "expected": len(expected)}
            times = published[job]
            delays += [(t - times[str(i)]) * 1000 for i, t in seen if str(i) in times]
        result["complete"] = complete
        result["events_per_second"] = len(delays) / seconds
        result["delay_ms"] = {q: float(np.percentile(delays, int(q))) for q in ("50", "99")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1000,5000")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rate", type=float, default=2.0, help="loss points a second a job")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--poll-rate", type=float, default=1000.0)
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE,
        help="a PostgreSQL server's URL; the bench makes its own database",
    )
    parser.add_argument("--stream-check-seconds", type=float, default=2.0)
    parser.add_argument("--gunicorn-args", default="", help="e.g. --worker-class gthread")
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of sockets

    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        redis_process, redis_url = start_embedded_redis(base)
        database_url = _fresh_database(args.database_url)
        web = None
        try:
            settings = bench_settings(
                base,
                redis_url,
                database_url,
                event_streams_per_client=100_000,
                stream_check_seconds=args.stream_check_seconds,
            )
            settings_file = base / "settings.json"
            settings_file.write_text(json.dumps(settings.environ()))
            port = free_port()
            env = {
                **os.environ,
                **settings.environ(),
                "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port} {args.gunicorn_args}",
            }
            del env["STYLEQUEUE_EVENT_STREAMS"]  # gunicorn.conf.py's, for gevent
            web = subprocess.Popen([sys.executable, "-m", "gunicorn"], env=env, cwd=ROOT)
            url = f"http://127.0.0.1:{port}"
            wait(
                lambda: requests.get(url + "/healthz", timeout=1).ok,
                60,
                "gunicorn",
                tolerate=(requests.RequestException,),
            )
            jobs = _submit_jobs(url, args.jobs)
            rows, start = [], 0
            for streams in [0, *(int(n) for n in args.streams.split(",") if n)]:
                row = _phase(
                    args,
                    base,
                    psutil.Process(web.pid),
                    port,
                    jobs,
                    streams,
                    start,
                    database_url,
                    settings_file,
                )
                start += int(args.seconds * args.rate)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if web is not None:
                web.terminate()
                web.wait(30)
            redis_process.terminate()
            redis_process.wait(10)
            _drop_database(database_url, args.database_url)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "streams.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"{machine()}; gunicorn as gunicorn.conf.py runs it (gevent, 2 processes), "
        f"{args.jobs} jobs at {args.rate:g} points a second each, {args.seconds:g} s a row, "
        f"polls at {args.poll_rate:g} a second meanwhile; client, publisher, web, Redis and "
        "PostgreSQL on the same 2 cores.",
        "",
        "| streams open | every point once, in order | delay p50 / p99 (ms) | "
        "loss events delivered/s | DB transactions/s | polls answered/s | polls p50 / p99 (ms) | "
        "cores: web / client |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        polls = row["polls"]
        delivered = f"{row['complete']} of {row['opened']}" if row["streams"] else "–"
        delay = (
            f"{row['delay_ms']['50']:.0f} / {row['delay_ms']['99']:.0f}" if row["streams"] else "–"
        )
        events = f"{row['events_per_second']:,.0f}" if row["streams"] else "–"
        lines.append(
            f"| {row['streams']} | {delivered} | {delay} | {events} | "
            f"{row['transactions_per_second']:.0f} | {polls['answered_rate']:.0f} | "
            f"{polls['latency']['50']:.1f} / {polls['latency']['99']:.1f} | "
            f"{row['web_cpu']:.2f} / {row['client_cpu']:.2f} |"
        )
    print("\n".join(lines))
    if args.update:
        update_section(args.update, "streams", lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port_, jobs_, streams_, ready_, out_ = sys.argv[2:7]
        _, hard_ = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard_, hard_))
        asyncio.run(
            _client(
                int(port_),
                json.loads(Path(jobs_).read_text()),
                int(streams_),
                Path(ready_),
                Path(out_),
            )
        )
    elif len(sys.argv) > 1 and sys.argv[1] == "--publish":
        settings_, jobs_, rate_, seconds_, start_, out_ = sys.argv[2:8]
        _publish(
            Path(settings_),
            json.loads(Path(jobs_).read_text()),
            float(rate_),
            float(seconds_),
            int(start_),
            Path(out_),
        )
    else:
        main()
