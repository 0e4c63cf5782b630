"""Re-enqueue what the broker lost: the database is the truth, Redis only carries messages.

Every ``reconcile_seconds`` one worker (a Redis lock elects it) looks for:

- running jobs whose lease expired and whose worker's heartbeat is gone (it died): set
  back to queued and sent again;
- queued jobs whose message is in no ready queue of the broker (Redis restarted without
  persistence, a message dropped): sent again;
- batches and videos whose parts have all ended but which have not (their assembler died):
  put together and ended (worker/parts.py);
- finished jobs past their time to live: their files deleted (those no live job shares) and
  the job marked expired;
- callbacks due: a finished job's first delivery (if its worker did not make it) and retries.

A duplicate message is harmless: :func:`worker.lease.claim` lets one worker take a job.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.config import Settings, preview_queue_of
from shared.models import PARENT_KINDS, Job, JobMode, JobStatus, JobStyle, StoredImage, utcnow
from shared.parts import FrameRun, frame_key
from shared.routing import JobTooLarge, all_queues, choose_queue
from shared.storage import Storage, fast_preview_key
from worker.lease import end_run
from worker.parts import settle_waiting
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)

LOCK_KEY = "stylequeue:reconciler"


def messages_in_queue(redis_client: Any, queue: str) -> str:
    """The raw ready job messages of every queue of ``queue`` (its tiers, its preview
    queue, their priority sub-queues), concatenated. A preview's message names its job too,
    but runs nothing: it is left out."""
    chunks = []
    for key in (key for name in all_queues(queue) for key in broker.queue_keys(name)):
        raw = (item.decode("utf-8", "replace") for item in redis_client.lrange(key, 0, -1))
        chunks += [message for message in raw if broker.RUN_JOB_TASK in message]
    return "\n".join(chunks)


def reconcile(
    sessions: sessionmaker[Session],
    redis_client: Any,
    queue: str,
    enqueue: Callable[[str, str], None],
    grace_seconds: float,
) -> list[str]:
    """One pass; returns the ids sent again, each routed afresh among the live workers (a
    job's old queue may have lost its consumers with the machine that died)."""
    now = utcnow()
    resend: list[uuid.UUID] = []
    with sessions.begin() as session:
        expired = session.execute(
            select(Job.id, Job.lease_owner, Job.attempts).where(
                Job.status == JobStatus.RUNNING,
                Job.lease_expires_at < now,
                Job.kind.not_in(PARENT_KINDS),  # a parent's assembly: worker/parts.py
            )
        ).all()
        for job_id, owner, attempt in expired:
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
                .values(status=JobStatus.QUEUED, lease_owner=None, enqueued_at=None)
            )
            if requeued.rowcount:  # type: ignore[attr-defined]
                end_run(session, job_id, attempt, "worker_lost")
                resend.append(job_id)
        stale = session.execute(
            select(Job.id, Job.queue).where(
                Job.status == JobStatus.QUEUED,
                Job.kind.not_in(PARENT_KINDS),  # never sent: its parts are
                or_(
                    Job.enqueued_at.is_(None),  # the web could not reach the broker
                    Job.enqueued_at < now - timedelta(seconds=grace_seconds),
                ),
            )
        ).all()
        workers = broker.live_workers(redis_client)
        if stale:
            waiting = messages_in_queue(redis_client, queue)
            consumed = {q for worker in workers for q in worker.get("queues", [])}
            # Sent again: a lost message, or one waiting in a queue nobody consumes any
            # more (its machine died); the old message, if it is ever taken, is harmless.
            resend += [
                job_id
                for job_id, job_queue in stale
                if str(job_id) not in waiting or (consumed and job_queue not in consumed)
            ]
        sent: list[tuple[str, str]] = []
        for job_id in dict.fromkeys(resend):
            memory, mode = session.execute(
                select(Job.memory_bytes, Job.mode).where(Job.id == job_id)
            ).one()
            try:
                target = (
                    preview_queue_of(queue)
                    if mode == JobMode.FAST
                    else choose_queue(queue, memory or 0, workers)
                )
            except JobTooLarge as error:  # a larger worker may come back: keep it queued
                log.warning("job %s waits: %s", job_id, error.message)
                continue
            session.execute(
                update(Job).where(Job.id == job_id).values(enqueued_at=now, queue=target)
            )
            sent.append((str(job_id), target))
    for job_id, target in sent:
        enqueue(job_id, target)
    if sent:
        log.info("re-enqueued %d job(s): %s", len(sent), ", ".join(i for i, _ in sent))
    return [job_id for job_id, _ in sent]


def expire_jobs(sessions: sessionmaker[Session], storage: Storage, ttl_seconds: float) -> int:
    """Delete the files of jobs finished more than ``ttl_seconds`` ago; returns how many.

    A file another live job still uses (an input stored once by hash, a reused result)
    stays. A later submission of an expired input stores it again.
    """
    if ttl_seconds <= 0:
        return 0
    now = utcnow()
    with sessions.begin() as session:
        jobs = session.scalars(
            select(Job)
            .where(Job.finished_at < now - timedelta(seconds=ttl_seconds), Job.expired_at.is_(None))
            .limit(100)
        ).all()
        for job in jobs:
            job.expired_at = now
        session.flush()
        live = Job.expired_at.is_(None)
        for job in jobs:
            files = {job.result_key, job.preview_key, job.checkpoint_key, fast_preview_key(job.id)}
            if job.frames is not None:  # a video's run: each frame it stored
                run = FrameRun.of_job(job.frames)
                files |= {frame_key(job.id, index) for index in range(run.first, run.stop)}
            for key in files - {None}:
                shared = session.scalar(
                    select(func.count()).where(
                        live, or_(Job.result_key == key, Job.preview_key == key)
                    )
                )
                if not shared:
                    storage.delete(key)
            for digest in {job.content_sha256, *(style.image_sha256 for style in job.styles)}:
                used = session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .outerjoin(JobStyle)
                    .where(live, or_(Job.content_sha256 == digest, JobStyle.image_sha256 == digest))
                )
                stored = session.get(StoredImage, digest)
                if not used and stored is not None:
                    storage.delete(stored.storage_key)
    if jobs:
        log.info("expired %d job(s)", len(jobs))
    return len(jobs)


def reconcile_once_elected(
    sessions: sessionmaker[Session],
    redis_client: Any,
    storage: Storage,
    settings: Settings,
    enqueue: Callable[[str, str], None],
) -> list[str]:
    """:func:`reconcile` and :func:`expire_jobs` if this worker wins the lock this time."""
    interval = settings.reconcile_seconds
    if not redis_client.set(LOCK_KEY, "1", nx=True, px=max(100, int(interval * 900))):
        return []
    sent = reconcile(sessions, redis_client, settings.queue, enqueue, grace_seconds=interval)
    settle_waiting(sessions, storage, redis_client, settings)
    expire_jobs(sessions, storage, settings.job_ttl_seconds)
    deliver_due(sessions, settings)
    return sent
