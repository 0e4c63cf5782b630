"""One job's run on a worker: claim, load, run the engine, report. No Celery here."""

from __future__ import annotations

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

from shared import feed
from shared.errors import StylequeueError
from shared.estimate import RATE_FIELD, job_work, smoothed
from shared.images import decode_image, encode_png
from shared.logs import job_context
from shared.models import Job, JobStatus, StoredImage, utcnow
from shared.options import INIT_FAST, plan_for
from shared.storage import Storage
from worker import lease
from worker.batching import claim_partners, run_engine
from worker.context import Context
from worker.engine import Checkpoint, Iterate, Result
from worker.lease import Claim
from worker.reporting import JobReporter, forget_points_after, result_key
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)


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

    _while_database_away(write)
    feed.publish(ctx.redis, claim.job_id, status=status.value)  # committed: now its watchers
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
    """Run one job: claim it, load its inputs (and checkpoint), run the engine, report.

    Queued jobs that can share its batch (``batch_jobs``, ``batch_max_size``) are claimed
    too and run with it, each with its own lease, reporter and ending; their own messages
    find them taken and are dropped (:func:`drop_unclaimable`).
    """
    settings = ctx.settings
    from worker.engine.device import resolve_device

    device = resolve_device(settings.device)
    claim = claim_job(ctx, job_uuid, str(device))
    if claim is None:
        drop_unclaimable(ctx, job_uuid)
        return
    if out_of_attempts(ctx, claim):
        return
    try:
        leader = ActiveRun.begin(ctx, claim, str(device))
    except StylequeueError as error:  # its options cannot run here (init=fast, no model)
        log.warning("job %s cannot run: %s", job_uuid, error)
        finish(ctx, claim, JobStatus.FAILED, error_code=error.code, error_message=error.public)
        return
    except Exception:  # its inputs unreadable, say: back to the queue, a limited number of times
        log.exception("job %s: could not start it", job_uuid)
        _release(ctx, claim)
        return
    runs = [leader]
    try:
        for partner in claim_partners(ctx, leader, _claim_runnable):
            try:
                runs.append(ActiveRun.begin(ctx, partner, leader.device))
            except Exception:
                log.exception("job %s: could not start it in this batch", partner.job_id)
                _release(ctx, partner)
        for active in runs:
            active.batch = runs
        if len(runs) > 1:
            log.info("running %d jobs as one batch: %s", len(runs),
                     ", ".join(str(a.claim.job_id) for a in runs))  # fmt: skip
        run_engine(ctx, runs)
    finally:
        for active in runs:
            if not active.ended:  # an exception got here first
                active.stop()
        ctx.activity.update(job=None, iterations_per_second=0.0)


def claim_job(ctx: Context, job_id: uuid.UUID, device: str) -> Claim | None:
    claim = lease.claim(
        ctx.sessions, job_id, f"{ctx.name}/{uuid.uuid4().hex[:8]}", ctx.settings.lease_seconds,
        host=ctx.host, worker=ctx.name, device=device,
    )  # fmt: skip
    if claim is not None:
        feed.publish(ctx.redis, job_id, status=JobStatus.RUNNING.value)
    return claim


def _claim_runnable(ctx: Context, job_id: uuid.UUID, device: str) -> Claim | None:
    """Claim a queued job for a batch: None if another worker was quicker or it has run
    out of attempts (then it is failed)."""
    claim = claim_job(ctx, job_id, device)
    return None if claim is None or out_of_attempts(ctx, claim) else claim


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


def _release(ctx: Context, claim: Claim) -> None:
    try:
        lease.release(ctx.sessions, claim)
    except Exception:  # the database is away: the job waits for this worker's end (the
        # reconciler takes over expired leases of workers whose heartbeat is gone)
        log.exception("job %s: could not give it back to the queue", claim.job_id)


class ActiveRun:
    """A run of a claimed job on this worker (the worker's side of its
    :class:`shared.models.JobRun` row): its inputs, lease, reporter, watchdog and limits."""

    def __init__(self, ctx: Context, claim: Claim, device: str) -> None:
        self.claim = claim
        self.device = device
        self.settings = ctx.settings
        self.activity = ctx.activity
        self.speed = 0.0  #: this job's iterations per second
        with ctx.sessions.begin() as session:
            job = session.get(Job, claim.job_id)
            assert job is not None
            self.params = dict(job.params)
            self.memory_bytes = job.memory_bytes or 0
            self.content = load_image(session, ctx.storage, job.content_sha256)
            self.styles = [load_image(session, ctx.storage, s.image_sha256) for s in job.styles]
            self.weights = [s.weight for s in job.styles]
            self.resume_from: Checkpoint | None = None
            if job.checkpoint_key and ctx.storage.exists(job.checkpoint_key):
                self.resume_from = Checkpoint.load(ctx.storage.get(job.checkpoint_key))
                # Points after the checkpoint are computed again: replaced, never duplicated.
                forget_points_after(session, claim.job_id, self.resume_from.iteration)
                # Normally what the claim wrote; not if the worker died between writing the
                # checkpoint file and recording its iteration.
                job.resumed_from_iteration = job.iteration = self.resume_from.iteration
        #: ``init=fast``: the feed-forward picture the run starts from.
        self.init: Any = self.params["init"]
        if self.init == INIT_FAST:
            if self.resume_from is None:
                from worker.instant import fast_picture  # onnxruntime, only when asked for

                self.init = fast_picture(
                    ctx, claim.job_id, self.content, self.styles, self.weights, self.params["size"]
                )
            else:  # a resumed run starts from its checkpoint; the engine needs a valid value
                self.init = "content"
        self.keeper = lease.LeaseKeeper(ctx.sessions, claim, self.settings.lease_seconds)
        self.reporter = JobReporter(
            claim.job_id, ctx.sessions, ctx.storage, ctx.redis, self.settings.loss_flush_seconds
        )
        self.watchdog = threading.Timer(
            self.settings.hard_time_limit, _hard_time_limit, args=(ctx, claim)
        )
        self.watchdog.daemon = True
        self.started = time.monotonic()
        self.first_iteration = self.resume_from.iteration if self.resume_from else 0
        self.soft_limit_reached = False
        self.ended = False
        #: The runs batched with this one (itself included): the worker's speed is theirs.
        self.batch: list[ActiveRun] = [self]

    @classmethod
    def begin(cls, ctx: Context, claim: Claim, device: str) -> ActiveRun:
        with job_context(str(claim.job_id)):
            active = cls(ctx, claim, device)
            log.info(
                "attempt %d on %s (%s): %s", claim.attempts, ctx.host, device,
                f"resumed from iteration {active.resume_from.iteration}"
                if active.resume_from else "from the start",
            )  # fmt: skip
        active.keeper.start()
        active.watchdog.start()
        return active

    def progress(self, iterate: Iterate) -> bool:
        self.soft_limit_reached = time.monotonic() - self.started > self.settings.soft_time_limit
        if iterate.elapsed > 0:  # for the heartbeat, and so for /metrics
            self.speed = (iterate.iteration - self.first_iteration) / iterate.elapsed
            # A batching worker's speed is that of its jobs together.
            total = sum(other.speed for other in self.batch if not other.ended)
            self.activity.update(job=str(self.claim.job_id), iterations_per_second=round(total, 3))
        return self.reporter.progress(iterate) or self.keeper.lost or self.soft_limit_reached

    def arguments(self) -> dict[str, Any]:
        """The engine's keyword arguments for this job."""
        return {
            "content": self.content,
            "styles": self.styles,
            "style_weights": self.weights,
            "device": self.device,
            "cuda_graphs": self.settings.cuda_graphs,
            "progress": self.progress,
            "preview_every": self.settings.preview_every,
            "checkpoint_every": self.settings.checkpoint_every,
            "on_checkpoint": self.reporter.checkpoint,
            "resume_from": self.resume_from,
            **self.params,
            **self._as_checkpointed(),
            "init": self.init,
        }

    def _as_checkpointed(self) -> dict[str, Any]:
        """For a resumed run, the defaults it started with where they have changed since:
        a job checkpointed before the style layers' default weights changed resumes with
        the weights it ran with (the checkpoint holds them), not with the new ones."""
        saved = self.resume_from.options if self.resume_from is not None else {}
        if self.params.get("style_layer_weights") is None and "style_layer_weights" in saved:
            return {"style_layer_weights": saved["style_layer_weights"]}
        return {}

    def plan_options(self) -> dict[str, Any]:
        return {name: self.params[name] for name in ("size", "scales", "iterations")}

    def stop(self) -> None:
        self.watchdog.cancel()
        self.keeper.stop()
        self.reporter.close()

    def settle(self, ctx: Context, outcome: Result | Exception) -> None:
        """Stop the run's threads and record its end; if that fails, give the job back
        to the queue rather than leave it running under a lease nobody renews."""
        self.ended = True
        self.stop()
        with job_context(str(self.claim.job_id)):
            try:
                self.end(ctx, outcome)
            except Exception:
                log.exception("job %s: could not record how it ended", self.claim.job_id)
                _release(ctx, self.claim)

    def end(self, ctx: Context, outcome: Result | Exception) -> None:
        """Record how the run ended: failed, lost, time-limited, canceled or succeeded."""
        claim, reporter = self.claim, self.reporter
        if isinstance(outcome, Exception):
            if isinstance(outcome, StylequeueError):
                log.warning("job %s failed: %s", claim.job_id, outcome)
                code, message = outcome.code, outcome.public
            else:
                log.error("job %s failed", claim.job_id, exc_info=outcome)
                # The details (paths, hosts) are for the log, not for the submitter.
                code, message = "internal_error", "the worker failed; the operators' log has why"
            _while_database_away(reporter.flush)
            finish(ctx, claim, JobStatus.FAILED, error_code=code, error_message=message)
            return
        if self.keeper.lost:
            return  # another worker has the job now; its points and files win
        _while_database_away(reporter.flush)
        if outcome.stopped and self.soft_limit_reached:
            message = (
                f"stopped at iteration {outcome.iterations} of {outcome.total}: past the soft "
                f"time limit of {self.settings.soft_time_limit:g} s"
            )
            finish(ctx, claim, JobStatus.FAILED, error_code="time_limit", error_message=message)
            return
        if outcome.stopped:
            finish(ctx, claim, JobStatus.CANCELED)
            return
        ctx.storage.put(result_key(claim.job_id), encode_png(outcome.image))
        finish(ctx, claim, JobStatus.SUCCEEDED, result_key=result_key(claim.job_id))
        if self.resume_from is None and len(self.batch) == 1 and outcome.elapsed > 0:
            # The worker's speed for the ETAs (shared/estimate.py), from a whole run.
            work = job_work(plan_for(**self.plan_options()), *self.content.size)
            ctx.note_speed(smoothed(ctx.activity.get(RATE_FIELD), work / outcome.elapsed))


def _hard_time_limit(ctx: Context, claim: Claim) -> None:
    """The run did not stop by itself: fail the job and end this worker process, the only
    way to interrupt an iteration that never ends (``serve`` or compose restarts it)."""
    message = f"the run exceeded the hard time limit of {ctx.settings.hard_time_limit:g} s"
    log.error("job %s: %s; exiting", claim.job_id, message)
    try:
        finish(ctx, claim, JobStatus.FAILED, error_code="hard_time_limit", error_message=message)
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


def drop_unclaimable(ctx: Context, job_id: uuid.UUID) -> None:
    """A message for a job nobody may start now: finished, held by a live worker, or
    canceled while queued (which is then marked so)."""
    with ctx.sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s does not exist; message dropped", job_id)
        elif job.job_status == JobStatus.QUEUED and job.cancel_requested:
            job.status, job.finished_at = JobStatus.CANCELED, utcnow()
