"""Who runs a job: a lease taken atomically in the database, kept alive by a heartbeat.

Two workers never run the same job at once: a worker starts a job only through
:func:`claim`, a single ``UPDATE ... WHERE`` that succeeds for a queued job or one whose
lease has expired, and for nobody else. While it runs, a :class:`LeaseKeeper` thread pushes
the expiry forward every third of the lease; a worker killed with SIGKILL stops renewing, so
its job's lease runs out and the reconciler (``worker/reconcile.py``) queues it again.
Workers' clocks are assumed to agree to well within a lease (NTP).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, func, or_, update
from sqlalchemy.orm import Session, sessionmaker

from shared.models import PARENT_KINDS, Job, JobKind, JobRun, JobStatus, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    owner: str
    attempts: int
    #: ``Job.kind``: a picture, or a run of a video's frames.
    kind: str = JobKind.PICTURE.value
    #: The batch or video the job is a part of.
    parent_id: uuid.UUID | None = None


def claim(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    *,
    host: str,
    worker: str,
    device: str,
) -> Claim | None:
    """Take the job if it is queued, or running under an expired lease; None otherwise.

    The worker's name and device are written in the same statement, and the attempt is
    recorded as a :class:`JobRun` in the same transaction.
    """
    now = utcnow()
    with sessions.begin() as session:
        taken = session.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.cancel_requested.is_(False),
                Job.kind.not_in(PARENT_KINDS),  # a batch or video runs as its parts
                or_(
                    Job.status == JobStatus.QUEUED,
                    and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
                ),
            )
            .values(
                status=JobStatus.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now),
                # Where this attempt starts: the last checkpoint, if any.
                resumed_from_iteration=func.coalesce(Job.checkpoint_iteration, 0),
                iteration=func.coalesce(Job.checkpoint_iteration, 0),
                worker=worker,
                device=device,
            )
            .returning(Job.attempts, Job.resumed_from_iteration, Job.queue, Job.kind, Job.parent_id)
        ).one_or_none()
        if taken is None:
            return None
        attempts, resumed_from, queue, kind, parent_id = taken
        if parent_id is not None:  # its first part started: the batch or video runs
            session.execute(
                update(Job)
                .where(Job.id == parent_id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.RUNNING, started_at=now)
            )
        end_run(session, job_id, attempts - 1, "worker_lost")  # taken over: the last one died
        session.add(
            JobRun(
                job_id=job_id, attempt=attempts, host=host, worker=worker, device=device,
                queue=queue, resumed_from_iteration=resumed_from, started_at=now,
            )
        )  # fmt: skip
    return Claim(job_id, owner, int(attempts), kind=kind, parent_id=parent_id)


def end_run(session: Session, job_id: uuid.UUID, attempt: int, outcome: str) -> None:
    """Record how an attempt ended (a job's status, or ``worker_lost``)."""
    session.execute(
        update(JobRun)
        .where(JobRun.job_id == job_id, JobRun.attempt == attempt, JobRun.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome=outcome)
    )


def release(sessions: sessionmaker[Session], job: Claim) -> None:
    """Give a claimed job back to the queue, if it is still ours: its attempt ends as
    ``released`` (and counts, so that a job that keeps failing to start ends up failed).
    The reconciler sends it again if its message is gone."""
    with sessions.begin() as session:
        ours = session.execute(
            update(Job)
            .where(Job.id == job.job_id, Job.lease_owner == job.owner)
            .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None)
        )
        if ours.rowcount:  # type: ignore[attr-defined]
            end_run(session, job.job_id, job.attempts, "released")


def renew(sessions: sessionmaker[Session], job: Claim, lease_seconds: float) -> bool:
    """Push the lease forward; False when the job is no longer ours."""
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job.job_id,
                Job.lease_owner == job.owner,
                Job.status == JobStatus.RUNNING,
            )
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


class LeaseKeeper(threading.Thread):
    """Renews a claim every third of the lease until stopped; notes if it was lost."""

    def __init__(self, sessions: sessionmaker[Session], job: Claim, lease_seconds: float) -> None:
        super().__init__(name=f"lease-{job.job_id}", daemon=True)
        self.sessions = sessions
        self.job = job
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3):
            try:
                if not renew(self.sessions, self.job, self.lease_seconds):
                    log.warning("lost the lease on job %s", self.job.job_id)
                    self.lost = True
                    return
            except Exception as error:  # the database may be away for a while: keep trying
                log.warning("could not renew the lease on job %s: %s", self.job.job_id, error)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
