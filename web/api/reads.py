"""Reading jobs for the API: the ORM load for views that change a job, and the status
poll's one cached Core statement; the live workers and their speeds; query arguments."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

from flask import (
    current_app,
    request,
)
from sqlalchemy import Connection, Row, bindparam, select
from sqlalchemy.orm import joinedload

from shared import broker
from shared.errors import NotFound, OptionError
from shared.estimate import Speeds
from shared.models import (
    Job,
    JobRun,
    JobStatus,
    JobStyle,
)
from shared.queue import QueueSnapshot, queue_ahead
from web.auth import may_see
from web.extensions import services

MAX_LOSS_PAGE = 10_000

T = TypeVar("T")
J = TypeVar("J", Job, Row[Any])


JOB_WITH_STYLES_AND_RUNS = (joinedload(Job.styles), joinedload(Job.runs))


def parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job {job_id!r}") from None


def visible(job: J | None, job_id: str) -> J:
    """``job`` if the caller may see it; another's job answers as if it did not exist."""
    if job is None or not may_see(job):
        raise NotFound(f"no job {job_id!r}")
    return job


def load_job(job_id: str) -> Job:
    key = parse_job_id(job_id)
    # One statement for the job, its styles and its runs, not three separate ORM loads.
    return visible(services.session.get(Job, key, options=JOB_WITH_STYLES_AND_RUNS), job_id)


def load_job_row(job_id: str) -> Row[Any]:
    """As :func:`load_job`, the job's row alone, read with Core (no styles, no runs)."""
    with services.reader.connect() as connection:
        job = connection.execute(JOB_ROW, {"job_id": parse_job_id(job_id)}).first()
    return visible(job, job_id)


# The status poll reads with Core: one cached statement on a pooled connection, no Session
# and no ORM objects. The ORM load above is a large share of a poll's CPU time under
# gunicorn (py-spy; bench/api.py). The job's row comes once per pair of its styles and
# runs (a few at most), as from the ORM's joined load; on PostgreSQL, one round trip
# instead of three.
jobs_table, styles_table, runs_table = Job.__table__, JobStyle.__table__, JobRun.__table__


JOB_ROW = select(jobs_table).where(jobs_table.c.id == bindparam("job_id"))
STYLE_FIELDS = [c.name for c in styles_table.c if c.name != "job_id"]


RUN_FIELDS = [c.name for c in runs_table.c if c.name != "job_id"]


JOB_STYLE_RUN_ROWS = (
    select(
        jobs_table,
        *(styles_table.c[name].label(f"style_{name}") for name in STYLE_FIELDS),
        *(runs_table.c[name].label(f"run_{name}") for name in RUN_FIELDS),
    )
    .outerjoin(styles_table, styles_table.c.job_id == jobs_table.c.id)
    .outerjoin(runs_table, runs_table.c.job_id == jobs_table.c.id)
    .where(jobs_table.c.id == bindparam("job_id"))
    .order_by(styles_table.c.position, runs_table.c.attempt)
)


def _distinct_parts(
    rows: Sequence[Row[Any]], prefix: str, fields: list[str], key: str
) -> list[SimpleNamespace]:
    """The distinct ``prefix``-labelled parts of ``rows`` (by ``key``), in their order."""
    parts: dict[Any, SimpleNamespace] = {}
    for row in rows:
        values = row._mapping
        identity = values[prefix + key]
        if identity is not None and identity not in parts:
            parts[identity] = SimpleNamespace(**{name: values[prefix + name] for name in fields})
    return list(parts.values())


def read_job(
    job_id: str,
) -> tuple[Row[Any], list[SimpleNamespace], list[SimpleNamespace], tuple[int, float] | None]:
    """A job the caller may see (its row), its styles, its runs and, while it is queued,
    its queue position and the work ahead of it, read-only."""
    with services.reader.connect() as connection:
        rows = connection.execute(JOB_STYLE_RUN_ROWS, {"job_id": parse_job_id(job_id)}).all()
        # may_see reads no database here: the caller was authenticated before the view.
        job = visible(rows[0] if rows else None, job_id)
        ahead = None
        if job.status == JobStatus.QUEUED:
            ahead = queue_snapshot(connection).ahead(job.created_at)
            if ahead is None:  # behind the snapshot's first QUEUE_SNAPSHOT_JOBS
                ahead = queue_ahead(connection, job.created_at)
    return (
        job,
        _distinct_parts(rows, "style_", STYLE_FIELDS, "position"),
        _distinct_parts(rows, "run_", RUN_FIELDS, "attempt"),
        ahead,
    )


def live_workers() -> list[dict[str, Any]]:
    """The workers' heartbeats; none when the broker is away (jobs are not refused for it)."""
    try:
        return broker.live_workers(services.redis)
    except Exception:
        return []


def offered_backbones(workers: list[dict[str, Any]]) -> list[str] | None:
    """The backbones ``workers`` (heartbeats) can run; None when no worker offers any
    (none is up: the default backbone then, shared.backbones.default_backbone)."""
    return sorted({name for worker in workers for name in worker.get("backbones", [])}) or None


#: How long a web process reuses the queue as it read it for the status polls of queued
#: jobs, and how many queued jobs it reads: one read a second, however many poll, instead
#: of a query per poll (the largest share of a queued job's poll); positions further back
#: are counted by a query of their own.
QUEUE_SECONDS = 1.0
QUEUE_SNAPSHOT_JOBS = 1000


def queue_snapshot(connection: Connection) -> QueueSnapshot:
    """The queue as this process read it at most ``QUEUE_SECONDS`` ago."""
    return _kept(
        "queue", QUEUE_SECONDS, lambda: QueueSnapshot.read(connection, QUEUE_SNAPSHOT_JOBS)
    )


#: How long a web process reuses the workers' speeds for its estimates (a queued job's ETA
#: in its status poll, ``/api/estimate``). A worker refreshes its heartbeat every few
#: seconds and the figure is an estimate, while reading the heartbeats costs three Redis
#: round trips: per poll, the largest cost after the database (bench/streams.py).
SPEEDS_SECONDS = 1.0


def worker_speeds() -> Speeds:
    """The live workers' measured speeds, read at most once a ``SPEEDS_SECONDS``."""
    return _kept("speeds", SPEEDS_SECONDS, lambda: Speeds.from_heartbeats(live_workers()))


def _kept(name: str, seconds: float, read: Callable[[], T]) -> T:
    """What ``read`` gave this process (app), kept under ``name`` for ``seconds`` from the
    end of that read.

    When it is due, the request that finds it so reads it afresh, and the others take the
    old value meanwhile. Else every request arriving during the read (a database round
    trip, on which other greenlets or threads run) would read too, and the busier the
    process, the longer the read and the more of them. Under gevent exactly one reads;
    threads that find it due at the same instant may each read. A read that fails leaves
    the old value for another ``seconds`` (that request gets the error): an outage costs
    one failing read per period, not one per request."""
    store = current_app.extensions["stylequeue"]
    now = time.monotonic()
    kept: tuple[float, T] | None = store.get(name)
    if kept is None or kept[0] <= now:
        if kept is not None:
            store[name] = (now + seconds, kept[1])  # taken: the rest keep the old value
        value = read()
        kept = store[name] = (time.monotonic() + seconds, value)
    return kept[1]


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise OptionError(f"must be a whole number, not {raw!r}", field=name) from None
    if not low <= value <= high:
        raise OptionError(f"must be between {low} and {high}", field=name)
    return value
