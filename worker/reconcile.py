"""Re-enqueue what the broker lost: the database is the truth, Redis only carries messages.

Every ``reconcile_seconds`` one worker (a Redis lock elects it) looks for:

- running jobs whose lease expired and whose worker's heartbeat is gone (it died): set
  back to queued and sent again;
- queued jobs whose message is in no ready queue of the broker (Redis restarted without
  persistence, a message dropped): sent again.

A duplicate message is harmless: :func:`worker.lease.claim` lets one worker take a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

LOCK_KEY = "stylequeue:reconciler"


def messages_in_queue(redis_client: Any, queue: str) -> str:
    """The raw ready messages of ``queue`` (and its priority sub-queues), concatenated."""
    chunks = []
    for key in redis_client.scan_iter(match=queue + "*"):
        if redis_client.type(key) == b"list":
            chunks += [item.decode("utf-8", "replace") for item in redis_client.lrange(key, 0, -1)]
    return "\n".join(chunks)


def reconcile(
    sessions: sessionmaker[Session],
    redis_client: Any,
    queue: str,
    enqueue: Callable[[str], None],
    grace_seconds: float,
) -> list[str]:
    """One pass; returns the ids sent again."""
    now = utcnow()
    sent: list[str] = []
    with sessions.begin() as session:
        expired = session.execute(
            select(Job.id, Job.lease_owner).where(
                Job.status == JobStatus.RUNNING, Job.lease_expires_at < now
            )
        ).all()
        for job_id, owner in expired:
            # A lease also runs out while the database is away; a worker whose heartbeat
            # is still in Redis is alive and renews it once the database answers again.
            if owner and broker.worker_alive(redis_client, owner.split("/")[0]):
                continue
            requeued = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status == JobStatus.RUNNING,
                    Job.lease_expires_at < now,
                )
                .values(status=JobStatus.QUEUED, lease_owner=None, enqueued_at=now)
            )
            if requeued.rowcount:  # type: ignore[attr-defined]
                sent.append(str(job_id))
        stale = session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.QUEUED,
                or_(
                    Job.enqueued_at.is_(None),  # the web could not reach the broker
                    Job.enqueued_at < now - timedelta(seconds=grace_seconds),
                ),
            )
        ).all()
        if stale:
            waiting = messages_in_queue(redis_client, queue)
            missing = [job_id for job_id in stale if str(job_id) not in waiting]
            for job_id in missing:
                session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=now))
                sent.append(str(job_id))
    for job_id in sent:
        enqueue(job_id)
    if sent:
        log.info("re-enqueued %d job(s): %s", len(sent), ", ".join(sent))
    return sent


def reconcile_once_elected(
    sessions: sessionmaker[Session],
    redis_client: Any,
    queue: str,
    enqueue: Callable[[str], None],
    interval: float,
) -> list[str]:
    """:func:`reconcile` if this worker wins the lock for this interval."""
    if not redis_client.set(LOCK_KEY, "1", nx=True, px=max(100, int(interval * 900))):
        return []
    return reconcile(sessions, redis_client, queue, enqueue, grace_seconds=interval)
