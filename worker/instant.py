"""The feed-forward picture of a job (worker/feedforward.py): an optimization job's instant
preview, a ``mode=fast`` job's result, an ``init=fast`` job's start. No Celery and no torch
here: the preview workers' tasks (worker/previews.py) and the optimization workers call
these; a fast job lives and ends through worker/lifecycle.py as any other.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass

from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared import feed
from shared.errors import StylequeueError
from shared.estimate import FAST_SECONDS_FIELD, smoothed
from shared.images import PREVIEW_COMPRESS_LEVEL, encode_png, synthetic_pair
from shared.models import PREVIEW_FEEDFORWARD, Job, JobKind, JobMode, JobStatus, StoredImage
from shared.options import RunOptions
from shared.parts import VideoMedia
from shared.pyramid import scaled_size
from shared.storage import fast_preview_key, result_key
from shared.video import encode_mp4, iter_frames
from worker import lifecycle
from worker.context import Context
from worker.feedforward import MAX_SIZE, get_feedforward
from worker.lifecycle import Inputs

log = logging.getLogger(__name__)

#: What a preview worker writes as its device in the job's runs.
DEVICE = "cpu (feed-forward)"


def _timed_picture(ctx: Context, inputs: Inputs, size: int) -> Image.Image:
    """The feed-forward picture; its time goes into the heartbeat (shared/estimate.py)."""
    started = time.perf_counter()
    picture = get_feedforward(ctx.settings.preview_threads).stylize(
        inputs.content, inputs.styles, inputs.weights, min(size, MAX_SIZE)
    )
    seconds = time.perf_counter() - started
    ctx.activity[FAST_SECONDS_FIELD] = round(
        smoothed(ctx.activity.get(FAST_SECONDS_FIELD), seconds), 4
    )
    return picture


def measure_fast_seconds(ctx: Context) -> None:
    """Time one picture of made-up images at the network's own size (384 px)."""
    content, style = synthetic_pair((384, 288), (256, 256))
    _timed_picture(ctx, Inputs(content, [style], [1.0]), 384)


def fast_picture(ctx: Context, job_id: uuid.UUID, inputs: Inputs, size: int) -> Image.Image:
    """The job's feed-forward picture: the preview worker's, when it made one already;
    else made here and stored as the job's preview, as a preview worker would have."""
    key = fast_preview_key(job_id)
    if ctx.storage.exists(key):
        # Our own PNG: only its parser runs.
        with Image.open(io.BytesIO(ctx.storage.get(key)), formats=("PNG",)) as image:
            return image.convert("RGB")
    picture = _timed_picture(ctx, inputs, size)
    _store_preview(ctx, job_id, picture)
    return picture


def _store_preview(ctx: Context, job_id: uuid.UUID, picture: Image.Image) -> bool:
    """Store the picture as the job's preview, iteration 0, unless the optimizer's first
    preview is there already (the page must not step back); True if it was stored."""
    ctx.storage.put(
        fast_preview_key(job_id), encode_png(picture, compress_level=PREVIEW_COMPRESS_LEVEL)
    )
    with ctx.sessions.begin() as session:
        stored = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.preview_iteration.is_(None))
            .values(
                preview_key=fast_preview_key(job_id),
                preview_iteration=0,
                preview_source=PREVIEW_FEEDFORWARD,
            )
        )
    if stored.rowcount:  # type: ignore[attr-defined]
        feed.publish(ctx.redis, job_id, preview={"iteration": 0, "source": PREVIEW_FEEDFORWARD})
    return bool(stored.rowcount)  # type: ignore[attr-defined]


def make_preview(ctx: Context, job_id: uuid.UUID) -> None:
    """An optimization job's instant preview; nothing if the job has ended, is gone, or
    has a preview of the optimizer's already."""
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.job_status.finished or job.preview_iteration is not None:
            return
        if job.job_kind == JobKind.VIDEO:
            video = _video_source(session, ctx, job)
        else:
            inputs = lifecycle.load_inputs(session, ctx.storage, job)
        size = RunOptions.of_job(job.params).size
    if job.job_kind == JobKind.VIDEO:
        _instant_video(ctx, job_id, video, size)
        return
    picture = _timed_picture(ctx, inputs, size)
    if _store_preview(ctx, job_id, picture):
        log.info("feed-forward preview stored")


@dataclass(frozen=True)
class _Video:
    """A video job's source, its header, and its styles decoded."""

    source: bytes
    media: VideoMedia
    styles: list[Image.Image]
    weights: list[float]


def _video_source(session: Session, ctx: Context, job: Job) -> _Video:
    stored = session.get(StoredImage, job.content_sha256)
    assert stored is not None and job.media is not None
    return _Video(
        source=ctx.storage.get(stored.storage_key),
        media=VideoMedia.of_job(job.media),
        styles=lifecycle.load_styles(session, ctx.storage, job),
        weights=[style.weight for style in job.styles],
    )


def _instant_video(ctx: Context, job_id: uuid.UUID, video: _Video, size: int) -> None:
    """A video's instant preview: the feed-forward network over every frame, as an MP4 at
    the source's frame rate (streamed: one frame held at a time)."""
    network = get_feedforward(ctx.settings.preview_threads)
    side = min(size, MAX_SIZE)
    frame_size = scaled_size(video.media.width, video.media.height, side)
    blended = network.blend(video.styles, video.weights)  # the styles once, not per frame
    pictures = (
        network.transform(frame, blended, side) for frame in iter_frames(video.source, frame_size)
    )
    key = f"jobs/{job_id}/instant.mp4"
    ctx.storage.put(key, encode_mp4(pictures, video.media.frame_rate))
    with ctx.sessions.begin() as session:
        stored = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.preview_iteration.is_(None))
            .values(preview_key=key, preview_iteration=0, preview_source=PREVIEW_FEEDFORWARD)
        )
    if stored.rowcount:  # type: ignore[attr-defined]
        feed.publish(ctx.redis, job_id, preview={"iteration": 0, "source": PREVIEW_FEEDFORWARD})
        log.info("feed-forward video stored")


def run_fast(ctx: Context, job_id: uuid.UUID) -> None:
    """A ``mode=fast`` job, start to end: its feed-forward picture is its result."""
    claim = lifecycle.begin(ctx, job_id, DEVICE)
    if claim is None:
        return
    started = time.perf_counter()
    try:
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.mode != JobMode.FAST:
                raise StylequeueError("an optimization job reached the preview queue")
            inputs = lifecycle.load_inputs(session, ctx.storage, job)
            size = RunOptions.of_job(job.params).size
        picture = _timed_picture(ctx, inputs, size)
        ctx.storage.put(result_key(job_id), encode_png(picture))
    except Exception as error:
        lifecycle.fail(ctx, claim, error, who="preview worker")
        return
    lifecycle.finish(
        ctx, claim, JobStatus.SUCCEEDED,
        result_key=result_key(job_id), preview_key=result_key(job_id), preview_iteration=0,
        preview_source=PREVIEW_FEEDFORWARD, elapsed=time.perf_counter() - started,
    )  # fmt: skip
