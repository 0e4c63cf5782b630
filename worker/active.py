"""A claimed job's run on an optimization worker (the worker's side of its
:class:`shared.models.JobRun` row): its inputs, lease, reporter, watchdog and limits, and
how it ends. Claims and the writes that end a job are worker/lifecycle.py's."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from shared.estimate import RATE_FIELD, job_work, smoothed
from shared.images import encode_png
from shared.logs import job_context
from shared.models import Job, JobStatus
from shared.options import INIT_FAST, RunOptions
from shared.pyramid import plan_for
from shared.storage import result_key
from worker import lease, lifecycle
from worker.context import Context
from worker.engine.types import Checkpoint, Iterate, Result
from worker.instant import fast_picture
from worker.lease import Claim
from worker.reporting import JobReporter, forget_points_after

log = logging.getLogger(__name__)


class ActiveRun:
    """A run of a claimed job on this worker, from :meth:`begin` to :meth:`settle`."""

    def __init__(self, ctx: Context, claim: Claim, device: str) -> None:
        self.claim = claim
        self.device = device
        self.settings = ctx.settings
        self.activity = ctx.activity
        self.speed = 0.0  #: this job's iterations per second
        with ctx.sessions.begin() as session:
            job = session.get(Job, claim.job_id)
            assert job is not None
            self.options = RunOptions.of_job(job.params)
            self.memory_bytes = job.memory_bytes or 0
            self.inputs = lifecycle.load_inputs(session, ctx.storage, job)
            self.resume_from: Checkpoint | None = None
            if job.checkpoint_key and ctx.storage.exists(job.checkpoint_key):
                self.resume_from = Checkpoint.load(ctx.storage.get(job.checkpoint_key))
                # Points after the checkpoint are computed again: replaced, never duplicated.
                forget_points_after(session, claim.job_id, self.resume_from.iteration)
                # Normally what the claim wrote; not if the worker died between writing the
                # checkpoint file and recording its iteration.
                job.resumed_from_iteration = job.iteration = self.resume_from.iteration
        #: ``init=fast``: the feed-forward picture the run starts from.
        self.init: Any = self.options.init
        if self.init == INIT_FAST:
            if self.resume_from is None:
                self.init = fast_picture(ctx, claim.job_id, self.inputs, self.options.size)
            else:  # a resumed run starts from its checkpoint; the engine needs a valid value
                self.init = "content"
        self.keeper, self.reporter, self.watchdog = guards(ctx, claim)
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
            "content": self.inputs.content,
            "styles": self.inputs.styles,
            "style_weights": self.inputs.weights,
            "device": self.device,
            "cuda_graphs": self.settings.cuda_graphs,
            "progress": self.progress,
            "preview_every": self.settings.preview_every,
            "checkpoint_every": self.settings.checkpoint_every,
            "on_checkpoint": self.reporter.checkpoint,
            "resume_from": self.resume_from,
            **self.options.engine_arguments(),
            **self._as_checkpointed(),
            "init": self.init,
        }

    def _as_checkpointed(self) -> dict[str, Any]:
        """For a resumed run, the defaults it started with where they have changed since:
        a job checkpointed before the style layers' default weights changed resumes with
        the weights it ran with (the checkpoint holds them), not with the new ones."""
        saved = self.resume_from.options if self.resume_from is not None else {}
        if self.options.style_layer_weights is None and "style_layer_weights" in saved:
            return {"style_layer_weights": saved["style_layer_weights"]}
        return {}

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
                lifecycle.release(ctx, self.claim)

    def end(self, ctx: Context, outcome: Result | Exception) -> None:
        """Record how the run ended: failed, lost, time-limited, canceled or succeeded."""
        claim, reporter = self.claim, self.reporter
        if isinstance(outcome, Exception):
            lifecycle.while_database_away(reporter.flush)
            lifecycle.fail(ctx, claim, outcome)
            return
        if self.keeper.lost:
            return  # another worker has the job now; its points and files win
        lifecycle.while_database_away(reporter.flush)
        if outcome.stopped and self.soft_limit_reached:
            message = (
                f"stopped at iteration {outcome.iterations} of {outcome.total}: past the soft "
                f"time limit of {self.settings.soft_time_limit:g} s"
            )
            lifecycle.finish(
                ctx, claim, JobStatus.FAILED, error_code="time_limit", error_message=message
            )
            return
        if outcome.stopped:
            lifecycle.finish(ctx, claim, JobStatus.CANCELED)
            return
        ctx.storage.put(result_key(claim.job_id), encode_png(outcome.image))
        lifecycle.finish(ctx, claim, JobStatus.SUCCEEDED, result_key=result_key(claim.job_id))
        if self.resume_from is None and len(self.batch) == 1 and outcome.elapsed > 0:
            # The worker's speed for the ETAs (shared/estimate.py), from a whole run.
            options = self.options
            plan = plan_for(options.size, options.scales, options.iterations)
            work = job_work(plan, *self.inputs.content.size)
            ctx.note_speed(smoothed(ctx.activity.get(RATE_FIELD), work / outcome.elapsed))


def guards(ctx: Context, claim: Claim) -> tuple[lease.LeaseKeeper, JobReporter, threading.Timer]:
    """What keeps a run on a worker in check, a picture's or a video's run of frames: the
    lease keeper, the reporter and the hard time limit's watchdog (not started yet)."""
    settings = ctx.settings
    keeper = lease.LeaseKeeper(ctx.sessions, claim, settings.lease_seconds)
    reporter = JobReporter(
        claim.job_id, ctx.sessions, ctx.storage, ctx.redis, settings.loss_flush_seconds
    )
    watchdog = threading.Timer(settings.hard_time_limit, hard_time_limit, args=(ctx, claim))
    watchdog.daemon = True
    return keeper, reporter, watchdog


def hard_time_limit(ctx: Context, claim: Claim) -> None:
    """The run did not stop by itself: fail the job and end this worker process, the only
    way to interrupt an iteration that never ends (``serve`` or compose restarts it)."""
    message = f"the run exceeded the hard time limit of {ctx.settings.hard_time_limit:g} s"
    log.error("job %s: %s; exiting", claim.job_id, message)
    try:
        lifecycle.finish(
            ctx, claim, JobStatus.FAILED, error_code="hard_time_limit", error_message=message
        )
    finally:
        os._exit(70)
