"""Where a queued job stands: how many jobs are ahead of it and how much work
(shared/estimate.py), by one query, or from a snapshot of the queue that answers every
status poll of a moment without one."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, and_, bindparam, case, func, select
from sqlalchemy.orm import Session

from shared.models import PARENT_KINDS, Job, JobStatus

_jobs = Job.__table__.c
#: A batch's or video's work is its parts': the parent itself runs nowhere.
_runs = _jobs.kind.not_in(PARENT_KINDS)
_queued_before = and_(
    _jobs.status == JobStatus.QUEUED.value, _jobs.created_at < bindparam("created_at"), _runs
)
_running = and_(_jobs.status == JobStatus.RUNNING.value, _jobs.total > 0, _runs)
#: A running job's work still to do.
_work_left = func.coalesce(_jobs.work, 0) * (_jobs.total - _jobs.iteration) / _jobs.total
# Built once (SQLAlchemy compiles it once and caches that): building the ORM expression
# anew is a large share of a queued job's status poll (cProfile). One statement
# counts the jobs ahead and sums their work: the queued ones whole, the running ones' rest.
QUEUE_AHEAD = select(
    func.coalesce(func.sum(case((_queued_before, 1), else_=0)), 0),
    func.coalesce(
        func.sum(
            case(
                (_queued_before, func.coalesce(_jobs.work, 0)),
                (_running, _work_left),
                else_=0,
            )
        ),
        0,
    ),
).where(_jobs.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))


def queue_ahead(db: Session | Connection, created_at: datetime) -> tuple[int, float]:
    """For a queued job created at ``created_at``: its position (1 for the next to start)
    and the work ahead of it (shared/estimate.py). ``db`` is a Session or, for the status
    poll, the Core connection that read the job."""
    count, work = db.execute(QUEUE_AHEAD, {"created_at": created_at}).one()
    return int(count) + 1, float(work)


_RUNNING_LEFT = select(func.coalesce(func.sum(_work_left), 0)).where(_running)
_QUEUED_IN_ORDER = (
    select(_jobs.created_at, func.coalesce(_jobs.work, 0))
    .where(_jobs.status == JobStatus.QUEUED.value, _runs)
    .order_by(_jobs.created_at)
    .limit(bindparam("limit"))
)


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue as read at one moment: each queued job's creation time, in order, with the
    work queued before it; the running jobs' work left. It answers :func:`queue_ahead` for
    any queued job without a query (the status poll's, when many poll at once)."""

    created: list[datetime]
    #: ``work_before[i]``: the work of the queued jobs before the i-th (one entry more).
    work_before: list[float]
    running_left: float
    #: Whether every queued job was read (else only the first ``limit``).
    whole: bool

    @classmethod
    def read(cls, db: Session | Connection, limit: int) -> QueueSnapshot:
        rows = db.execute(_QUEUED_IN_ORDER, {"limit": limit + 1}).all()
        whole, rows = len(rows) <= limit, rows[:limit]
        running_left = float(db.execute(_RUNNING_LEFT).scalar_one())
        work_before = [0.0]
        for _, work in rows:
            work_before.append(work_before[-1] + float(work))
        return cls([created for created, _ in rows], work_before, running_left, whole)

    def ahead(self, created_at: datetime) -> tuple[int, float] | None:
        """As :func:`queue_ahead`; None where the jobs ahead were not all read."""
        index = bisect_left(self.created, created_at)
        if index == len(self.created) and not self.whole:
            return None
        return index + 1, self.work_before[index] + self.running_left
