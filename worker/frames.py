"""A video's run of frames on an optimization worker: the part's lease, reports and ending,
as worker/active.py has them for a picture, around worker/video.py's frames.

Each stylized frame is stored as it is done (its loss points written first), and the job's
checkpoint is the frames stored: a run resumed on another worker starts after the last one,
from that frame warped, and loses no frame and no reported loss point.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from sqlalchemy import update

from shared.images import encode_png
from shared.logs import job_context
from shared.models import Job, JobStatus, StoredImage
from shared.options import RunOptions
from shared.parts import FrameRun, frame_key, load_frame, run_iterations
from shared.pyramid import scaled_size
from shared.video import read_frames
from worker import lifecycle
from worker.active import guards
from worker.context import Context
from worker.engine.types import Iterate
from worker.lease import Claim
from worker.reporting import forget_points_after
from worker.video import stylize_frames

log = logging.getLogger(__name__)


def run(ctx: Context, claim: Claim, device: str) -> None:
    """Run a claimed run of frames to its end (or its cancel, or its lost lease)."""
    with job_context(str(claim.job_id)):
        try:
            frames_run = FramesRun(ctx, claim, device)
        except Exception as error:
            lifecycle.fail(ctx, claim, error)
            return
        frames_run.run(ctx)


class FramesRun:
    def __init__(self, ctx: Context, claim: Claim, device: str) -> None:
        self.claim, self.device, self.settings = claim, device, ctx.settings
        with ctx.sessions.begin() as session:
            job = session.get(Job, claim.job_id)
            assert job is not None and job.frames is not None
            self.options = RunOptions.of_job(job.params)
            self.total = job.total
            self.run_frames = FrameRun.of_job(job.frames)
            self.styles = lifecycle.load_styles(session, ctx.storage, job)
            self.weights = [style.weight for style in job.styles]
            video = session.get(StoredImage, job.content_sha256)
            assert video is not None
            video_key, width, height = video.storage_key, video.width, video.height
            self.size = scaled_size(width, height, self.options.size)
            # The frames stored already: a run taken over goes on after them.
            self.done = 0
            while self.done < self.run_frames.count and ctx.storage.exists(
                frame_key(claim.job_id, self.run_frames.first + self.done)
            ):
                self.done += 1
            self.offset = run_iterations(self.options, self.done) if self.done else 0
            forget_points_after(session, claim.job_id, self.offset)
            job.resumed_from_iteration = job.iteration = self.offset
        self.video = ctx.storage.get(video_key)
        self.keeper, self.reporter, self.watchdog = guards(ctx, claim)
        self.started = time.monotonic()
        self.soft_limit_reached = False
        log.info("attempt %d: frames %d to %d, %d done before", claim.attempts,
                 self.run_frames.first, self.run_frames.stop - 1, self.done)  # fmt: skip

    def run(self, ctx: Context) -> None:
        self.keeper.start()
        self.watchdog.start()
        stopped = False
        try:
            stopped = self._frames(ctx)
        except Exception as error:
            self._stop()
            lifecycle.while_database_away(self.reporter.flush)
            lifecycle.fail(ctx, self.claim, error)
            return
        finally:
            ctx.activity.update(job=None, iterations_per_second=0.0)
        self._stop()
        self._end(ctx, stopped)

    def _frames(self, ctx: Context) -> bool:
        """Stylize the frames not done yet, storing each; True if stopped before the end."""
        first = self.run_frames.first + self.done
        # One more frame before them when resumed: the start of the next one.
        read_from = first - 1 if self.done else first
        sources = read_frames(self.video, read_from, self.run_frames.stop, self.size)
        start_after = None
        if self.done:
            start_after = (sources.pop(0), load_frame(ctx.storage, self.claim.job_id, first - 1))
        iterations = {"offset": self.offset}

        def progress(iterate: Iterate) -> bool:
            shifted = dataclasses.replace(
                iterate, iteration=iterations["offset"] + iterate.iteration, total=self.total
            )
            self.soft_limit_reached = (
                time.monotonic() - self.started > self.settings.soft_time_limit
            )
            if iterate.elapsed > 0:
                speed = round(iterate.iteration / iterate.elapsed, 3)
                ctx.activity.update(job=str(self.claim.job_id), iterations_per_second=speed)
            return self.reporter.progress(shifted) or self.keeper.lost or self.soft_limit_reached

        for frame in stylize_frames(
            sources, first_index=first, styles=self.styles, style_weights=self.weights,
            options=self.options, progress=progress, start_after=start_after,
            device=self.device, cuda_graphs=self.settings.cuda_graphs,
        ):  # fmt: skip
            if frame.result.stopped or self.keeper.lost:  # the frames are another's now
                return True
            iterations["offset"] += frame.result.iterations
            # The points first: a frame is stored only with every point before it.
            lifecycle.while_database_away(self.reporter.flush)
            ctx.storage.put(
                frame_key(self.claim.job_id, frame.index), encode_png(frame.result.image)
            )
            with ctx.sessions.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.claim.job_id, Job.lease_owner == self.claim.owner)
                    .values(checkpoint_iteration=iterations["offset"])
                )
        return False

    def _stop(self) -> None:
        self.watchdog.cancel()
        self.keeper.stop()
        self.reporter.close()

    def _end(self, ctx: Context, stopped: bool) -> None:
        if self.keeper.lost:
            return  # another worker has the run now
        lifecycle.while_database_away(self.reporter.flush)
        if stopped and self.soft_limit_reached:
            message = f"stopped past the soft time limit of {self.settings.soft_time_limit:g} s"
            lifecycle.finish(ctx, self.claim, JobStatus.FAILED, error_code="time_limit",
                             error_message=message)  # fmt: skip
        elif stopped:
            lifecycle.finish(ctx, self.claim, JobStatus.CANCELED)
        else:
            last = frame_key(self.claim.job_id, self.run_frames.stop - 1)
            lifecycle.finish(ctx, self.claim, JobStatus.SUCCEEDED, result_key=last,
                             iteration=self.total)  # fmt: skip
