"""A job's life on any worker, without torch: claim it, load its inputs, end it.

The optimization worker (worker/runner.py, worker/active.py, worker/batching.py) and the
preview worker (worker/instant.py) both go through here, so a job is claimed, failed, run out
of attempts and ended the same way whichever worker has it. No Celery and no torch here (an
import contract in pyproject.toml keeps torch off the preview worker's path).

Expected failures become the job's error in one place, :func:`failure`, as readthedocs'
tasks map the exceptions they ``throw`` to the build's message in ``on_failure``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared import feed
from shared.errors import StylequeueError
from shared.images import decode_image
from shared.models import Job, JobStatus, StoredImage, utcnow
from shared.storage import Storage
from worker import lease, parts
from worker.context import Context
from worker.lease import Claim
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)

#: How long a finished run waits for an unreachable database before giving up; the job's
#: lease then expires and another worker redoes the work since its last checkpoint.
DATABASE_WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class Inputs:
    """A job's images, decoded, and its styles' blend weights."""

    content: Image.Image
    styles: list[Image.Image]
    weights: list[float]


def load_image(session: Session, storage: Storage, sha256: str) -> Image.Image:
    stored = session.get(StoredImage, sha256)
    assert stored is not None, sha256
    data = storage.get(stored.storage_key)
    # Checked again as the web checked the upload (shared.images.probe_image): the formats,
    # the pixels (the stored size's) and a JPEG's scans, before any pixel is decoded, so
    # that storage written by other means cannot cost more. Upright: a phone photo is
    # stored as taken, with its orientation in EXIF; 16-bit and transparent images are
    # scaled and composited as the CLI's decode does.
    return decode_image(data, max_bytes=len(data), max_pixels=stored.width * stored.height)


def load_styles(session: Session, storage: Storage, job: Job) -> list[Image.Image]:
    return [load_image(session, storage, style.image_sha256) for style in job.styles]


def load_inputs(session: Session, storage: Storage, job: Job) -> Inputs:
    return Inputs(
        content=load_image(session, storage, job.content_sha256),
        styles=load_styles(session, storage, job),
        weights=[style.weight for style in job.styles],
    )


def claim_job(ctx: Context, job_id: uuid.UUID, device: str) -> Claim | None:
    """Take the job's lease, or None if another worker holds it or it is not queued."""
    claim = lease.claim(
        ctx.sessions, job_id, f"{ctx.name}/{uuid.uuid4().hex[:8]}", ctx.settings.lease_seconds,
        host=ctx.host, worker=ctx.name, device=device,
    )  # fmt: skip
    if claim is not None:
        feed.publish(ctx.redis, job_id, status=JobStatus.RUNNING.value)
        if claim.parent_id is not None:
            feed.publish(ctx.redis, claim.parent_id, status=JobStatus.RUNNING.value)
    return claim


def claim_runnable(ctx: Context, job_id: uuid.UUID, device: str) -> Claim | None:
    """Claim the job if it may run: None if another worker was quicker or it has run out
    of attempts (then it is failed)."""
    claim = claim_job(ctx, job_id, device)
    return None if claim is None or out_of_attempts(ctx, claim) else claim


def begin(ctx: Context, job_id: uuid.UUID, device: str) -> Claim | None:
    """The start of a job's task: its claim if it may run, else None, with the message of
    a job nobody may start now dropped (:func:`drop_unclaimable`)."""
    claim = claim_job(ctx, job_id, device)
    if claim is None:
        drop_unclaimable(ctx, job_id)
        return None
    return None if out_of_attempts(ctx, claim) else claim


def out_of_attempts(ctx: Context, claim: Claim) -> bool:
    """Fail a job its workers died on too often; True if it was."""
    if claim.attempts <= ctx.settings.max_attempts:
        return False
    message = (
        f"the job was started {claim.attempts - 1} times without finishing (its worker "
        f"died, or could not start it, each time); the limit is {ctx.settings.max_attempts}"
    )
    finish(ctx, claim, JobStatus.FAILED, error_code="too_many_attempts", error_message=message)
    return True


def drop_unclaimable(ctx: Context, job_id: uuid.UUID) -> None:
    """A message for a job nobody may start now: finished, held by a live worker, or
    canceled while queued (which is then marked so)."""
    parent_id = None
    with ctx.sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
        elif job.job_status == JobStatus.QUEUED and job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELED, utcnow()
            parent_id = job.parent_id
    if parent_id is not None:
        parts.settle(ctx.sessions, ctx.storage, ctx.redis, ctx.settings, parent_id)


def release(ctx: Context, claim: Claim) -> None:
    """Give the job back to the queue (its attempt counts)."""
    try:
        lease.release(ctx.sessions, claim)
    except Exception:  # the database is away: the job waits for this worker's end (the
        # reconciler takes over expired leases of workers whose heartbeat is gone)
        log.exception("job %s: could not give it back to the queue", claim.job_id)


def failure(error: Exception, job_id: uuid.UUID, who: str = "worker") -> tuple[str, str]:
    """The job's ``error_code`` and ``error_message`` for an exception that ended it, logged.

    A :class:`StylequeueError` is the job's own fault (its options, its images, a model
    this worker lacks): its code and public message. Anything else is ours: the details
    (paths, hosts) go to the log, not to the submitter.
    """
    if isinstance(error, StylequeueError):
        log.warning("job %s failed: %s", job_id, error)
        return error.code, error.public
    log.error("job %s failed", job_id, exc_info=error)
    return "internal_error", f"the {who} failed; the operators' log has why"


def fail(ctx: Context, claim: Claim, error: Exception, who: str = "worker") -> None:
    code, message = failure(error, claim.job_id, who)
    finish(ctx, claim, JobStatus.FAILED, error_code=code, error_message=message)


def finish(ctx: Context, claim: Claim, status: JobStatus, **values: Any) -> None:
    """End the job, if it is still ours (a worker that lost its lease writes nothing);
    waits for the database if it is away."""

    def write() -> bool:
        with ctx.sessions.begin() as session:
            ours = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.lease_owner == claim.owner)
                .values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
            )
            if ours.rowcount:  # type: ignore[attr-defined]
                lease.end_run(session, claim.job_id, claim.attempts, status.value)
        return True

    while_database_away(write)
    feed.publish(ctx.redis, claim.job_id, status=status.value)  # committed: now its watchers
    log.info("attempt %d ended: %s", claim.attempts, status.value)
    if claim.parent_id is not None:  # the batch's or video's end, if this was its last part
        try:
            parts.part_ended(ctx.sessions, ctx.storage, ctx.redis, ctx.settings, claim.job_id)
        except Exception:  # the reconciler's pass settles it (worker/parts.py)
            log.exception("job %s: could not settle its parent", claim.job_id)
    # The callback now, not at the reconciler's next pass (which retries failures), and on
    # a thread of its own: a slow receiver must not hold up the worker's next job.
    threading.Thread(target=_deliver_callback, args=(ctx, claim.job_id), daemon=True).start()


def _deliver_callback(ctx: Context, job_id: uuid.UUID) -> None:
    try:
        deliver_due(ctx.sessions, ctx.settings, job_id)
    except Exception as error:
        log.warning("callback of job %s: %s; the reconciler will retry", job_id, error)


def while_database_away(write: Callable[[], bool]) -> None:
    """Call ``write`` until it succeeds (returns True without a database error), for at
    most DATABASE_WAIT_SECONDS."""
    deadline = time.monotonic() + DATABASE_WAIT_SECONDS
    delay = 0.5
    while True:
        try:
            if write():
                return
        except DBAPIError as error:
            log.warning("database unavailable, retrying: %s", error.orig)
        if time.monotonic() > deadline:
            raise RuntimeError("the database stayed unreachable; the job will be retried")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
