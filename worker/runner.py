"""One job's run on a worker: claim, load, run the engine, report. No Celery here."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from PIL import Image
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.errors import StylequeueError
from shared.images import encode_png
from shared.models import Job, JobStatus, StoredImage, utcnow
from shared.storage import Storage
from worker import lease
from worker.context import Context
from worker.engine import Checkpoint, Iterate, stylize
from worker.lease import Claim
from worker.reporting import JobReporter, forget_points_after, result_key
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


def _load_image(session: Session, storage: Storage, sha256: str) -> Image.Image:
    stored = session.get(StoredImage, sha256)
    assert stored is not None, sha256
    image = Image.open(io.BytesIO(storage.get(stored.storage_key)))
    image.load()
    return image.convert("RGB")


def _finish(ctx: Context, claim: Claim, status: JobStatus, **values: Any) -> None:
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

    _while_database_away(write)
    log.info("attempt %d ended: %s", claim.attempts, status.value)
    # The callback now, not at the reconciler's next pass (which retries failures), and on
    # a thread of its own: a slow receiver must not hold up the worker's next job.
    threading.Thread(target=_deliver_callback, args=(ctx, claim.job_id), daemon=True).start()


def _deliver_callback(ctx: Context, job_id: uuid.UUID) -> None:
    try:
        deliver_due(ctx.sessions, ctx.settings, job_id)
    except Exception as error:
        log.warning("callback of job %s: %s; the reconciler will retry", job_id, error)


def run(ctx: Context, job_uuid: uuid.UUID) -> None:
    """Run one job: claim it, load its inputs (and checkpoint), run the engine, report."""
    settings = ctx.settings
    from worker.engine.optimize import resolve_device

    device = resolve_device(settings.device)
    claim = lease.claim(
        ctx.sessions, job_uuid, f"{ctx.name}/{uuid.uuid4().hex[:8]}", settings.lease_seconds,
        host=ctx.host, worker=ctx.name, device=str(device),
    )  # fmt: skip
    if claim is None:
        _drop_unclaimable(ctx, job_uuid)
        return
    if claim.attempts > settings.max_attempts:
        message = (
            f"the job was started {claim.attempts - 1} times without finishing (its worker "
            f"died each time); the limit is {settings.max_attempts}"
        )
        _finish(ctx, claim, JobStatus.FAILED, error_code="too_many_attempts", error_message=message)
        return

    with ctx.sessions.begin() as session:
        job = session.get(Job, job_uuid)
        assert job is not None
        params = dict(job.params)
        content = _load_image(session, ctx.storage, job.content_sha256)
        styles = [_load_image(session, ctx.storage, s.image_sha256) for s in job.styles]
        weights = [s.weight for s in job.styles]
        resume_from = None
        if job.checkpoint_key and ctx.storage.exists(job.checkpoint_key):
            resume_from = Checkpoint.load(ctx.storage.get(job.checkpoint_key))
            # Points after the checkpoint are computed again: replaced, never duplicated.
            forget_points_after(session, job_uuid, resume_from.iteration)
            # Normally what the claim wrote; not if the worker died between writing the
            # checkpoint file and recording its iteration.
            job.resumed_from_iteration = job.iteration = resume_from.iteration

    log.info(
        "attempt %d on %s (%s): %s", claim.attempts, ctx.host, device,
        f"resumed from iteration {resume_from.iteration}" if resume_from else "from the start",
    )  # fmt: skip
    keeper = lease.LeaseKeeper(ctx.sessions, claim, settings.lease_seconds)
    keeper.start()
    reporter = JobReporter(
        job_uuid, ctx.sessions, ctx.storage, ctx.redis, settings.loss_flush_seconds
    )
    started = time.monotonic()
    soft_limit_reached = False
    first_iteration = resume_from.iteration if resume_from else 0

    def progress(iterate: Iterate) -> bool:
        nonlocal soft_limit_reached
        soft_limit_reached = time.monotonic() - started > settings.soft_time_limit
        if iterate.elapsed > 0:  # for the heartbeat, and so for /metrics
            speed = (iterate.iteration - first_iteration) / iterate.elapsed
            ctx.activity.update(job=str(job_uuid), iterations_per_second=round(speed, 3))
        return reporter.progress(iterate) or keeper.lost or soft_limit_reached

    watchdog = threading.Timer(settings.hard_time_limit, _hard_time_limit, args=(ctx, claim))
    watchdog.daemon = True
    watchdog.start()

    try:
        result = stylize(
            content=content,
            styles=styles,
            style_weights=weights,
            device=str(device),
            progress=progress,
            preview_every=settings.preview_every,
            checkpoint_every=settings.checkpoint_every,
            on_checkpoint=reporter.checkpoint,
            resume_from=resume_from,
            **params,
        )
    except StylequeueError as error:
        _while_database_away(reporter.flush)
        _finish(ctx, claim, JobStatus.FAILED, error_code=error.code, error_message=str(error))
        return
    except Exception as error:
        log.exception("job %s failed", job_uuid)
        _while_database_away(reporter.flush)
        message = f"{type(error).__name__}: {error}"
        _finish(ctx, claim, JobStatus.FAILED, error_code="internal_error", error_message=message)
        return
    finally:
        watchdog.cancel()
        keeper.stop()
        reporter.close()
        ctx.activity.update(job=None, iterations_per_second=0.0)
    if keeper.lost:
        return  # another worker has the job now; its points and files win
    _while_database_away(reporter.flush)
    if result.stopped and soft_limit_reached:
        message = (
            f"stopped at iteration {result.iterations} of {result.total}: past the soft time "
            f"limit of {settings.soft_time_limit:g} s"
        )
        _finish(ctx, claim, JobStatus.FAILED, error_code="time_limit", error_message=message)
        return
    if result.stopped:
        _finish(ctx, claim, JobStatus.CANCELED)
        return
    ctx.storage.put(result_key(job_uuid), encode_png(result.image))
    _finish(ctx, claim, JobStatus.SUCCEEDED, result_key=result_key(job_uuid))


def _hard_time_limit(ctx: Context, claim: Claim) -> None:
    """The run did not stop by itself: fail the job and end this worker process, the only
    way to interrupt an iteration that never ends (``serve`` or compose restarts it)."""
    message = f"the run exceeded the hard time limit of {ctx.settings.hard_time_limit:g} s"
    log.error("job %s: %s; exiting", claim.job_id, message)
    try:
        _finish(ctx, claim, JobStatus.FAILED, error_code="hard_time_limit", error_message=message)
    finally:
        os._exit(70)


#: How long a finished run waits for an unreachable database before giving up; the job's
#: lease then expires and another worker redoes the work since its last checkpoint.
DATABASE_WAIT_SECONDS = 600.0


def _while_database_away(write: Callable[[], bool]) -> None:
    """Call ``write`` until it succeeds (returns True without a database error)."""
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


def _drop_unclaimable(ctx: Context, job_id: uuid.UUID) -> None:
    """A message for a job nobody may start now: finished, held by a live worker, or
    canceled while queued (which is then marked so)."""
    with ctx.sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
        elif job.job_status == JobStatus.QUEUED and job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELED, utcnow()
