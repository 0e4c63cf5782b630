"""Jobs of many parts: a batch of photos, or a video cut into runs of frames.

A part is a job row of its own (``parent_id`` set), so that it is routed, claimed, leased,
checkpointed, resumed and canceled as a one-picture job is; the parent is never sent to a
worker and ends when its parts have (worker/parts.py puts its result together). Here: how
a video is cut, where a part's frames are stored, and what a parent's JSON says of its parts.
"""

from __future__ import annotations

import io
import itertools
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from PIL import Image
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import OptionError
from shared.estimate import job_work
from shared.images import ImageInfo, probe_image
from shared.models import Job, JobKind, JobStatus
from shared.options import RunOptions
from shared.pyramid import pyramid, scaled_pixels
from shared.storage import Storage
from shared.video import VideoInfo, VideoLimits, is_video, probe_video


@dataclass(frozen=True)
class FrameRun:
    """A part of a video: it owns frames ``start`` to ``stop`` (stop excluded) and also makes
    the ``overlap`` frames before ``start``, which the previous run made too: the seam."""

    start: int
    stop: int
    overlap: int

    @property
    def first(self) -> int:
        """The first frame the run makes."""
        return self.start - self.overlap

    @property
    def count(self) -> int:
        return self.stop - self.first

    def stored(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def of_job(cls, frames: dict[str, Any]) -> FrameRun:
        return cls(start=frames["start"], stop=frames["stop"], overlap=frames["overlap"])


def cut(frames: int, run_frames: int, seam_frames: int) -> list[FrameRun]:
    """A video of ``frames`` frames cut into runs of ``run_frames``; each run but the first
    also makes the ``seam_frames`` frames before its own (at most its own count). A short
    last run is merged into the one before, so that no run is a frame or two."""
    starts = list(range(0, frames, run_frames))
    if len(starts) > 1 and frames - starts[-1] < max(2, run_frames // 2):
        starts.pop()
    bounds = [*starts, frames]
    return [
        FrameRun(start=start, stop=stop, overlap=0 if start == 0 else min(seam_frames, start))
        for start, stop in itertools.pairwise(bounds)
    ]


def later_frame_iterations(options: RunOptions) -> int:
    """A run's frames after its first start from the one before, warped, and make half the
    iterations on one scale (worker/video.py)."""
    return max(1, options.iterations // 2)


def run_iterations(options: RunOptions, frames: int) -> int:
    """The iterations of a run of ``frames`` frames, its first frame's in full."""
    return options.iterations + (frames - 1) * later_frame_iterations(options)


def run_work(options: RunOptions, size: tuple[int, int], frames: int) -> int:
    """A run's work for the ETA and the limits (shared/estimate.py): its first frame's
    pyramid, then its later frames' iterations at the output size."""
    first = job_work(pyramid(options.size, options.scales, options.iterations), *size)
    later = later_frame_iterations(options) * scaled_pixels(*size, options.size)
    return first + (frames - 1) * later


@dataclass(frozen=True)
class VideoMedia:
    """A video job's source as its header says (``Job.media``): what the result keeps."""

    width: int
    height: int
    frames: int
    fps: str  #: a fraction, "30000/1001"
    audio: bool

    @property
    def frame_rate(self) -> Fraction:
        return Fraction(self.fps)

    @classmethod
    def of_info(cls, info: VideoInfo) -> VideoMedia:
        fps = f"{info.fps.numerator}/{info.fps.denominator}"
        return cls(width=info.width, height=info.height, frames=info.frames, fps=fps,
                   audio=info.audio)  # fmt: skip

    @classmethod
    def of_job(cls, media: dict[str, Any]) -> VideoMedia:
        return cls(**media)


def frame_key(job_id: uuid.UUID, index: int) -> str:
    """A run's stylized frame ``index`` (of the video), stored as it is made."""
    return f"jobs/{job_id}/frames/{index:06d}.png"


def load_frame(storage: Storage, job_id: uuid.UUID, index: int) -> Image.Image:
    """A run's stored frame ``index``, decoded (our own PNG: only its parser runs)."""
    with Image.open(io.BytesIO(storage.get(frame_key(job_id, index))), formats=("PNG",)) as image:
        return image.convert("RGB")


def batch_item_name(index: int) -> str:
    return f"{index + 1:03d}.png"


def parts_json(parts: list[Job]) -> dict[str, Any]:
    """A parent's ``parts``: how many, how many done, and each one's state."""
    items = []
    for part in sorted(parts, key=lambda p: p.part_index or 0):
        item: dict[str, Any] = {
            "id": str(part.id),
            "index": part.part_index,
            "status": part.status,
            "iteration": part.iteration,
            "total": part.total,
            "loss": part.loss_total,
        }
        if part.frames is not None:
            run = FrameRun.of_job(part.frames)
            item["frames"] = {"first": run.first, "start": run.start, "stop": run.stop}
        items.append(item)
    done = sum(1 for part in parts if part.job_status == JobStatus.SUCCEEDED)
    return {"total": len(parts), "done": done, "items": items}


def parts_of(session: Session, job: Job | Row[Any]) -> list[Job]:
    """A batch's or video's parts, in order; none for a one-picture job. ``job``: its ORM
    row, or the Core row a status poll reads."""
    if not JobKind(job.kind).has_parts:
        return []
    return list(
        session.scalars(select(Job).where(Job.parent_id == job.id).order_by(Job.part_index))
    )


def probe_contents(
    uploads: list[bytes], settings: Settings, limits: dict[str, Any]
) -> list[tuple[bytes, ImageInfo | VideoInfo]]:
    """The content photos (a batch when several) or the one video, checked from their
    headers."""
    if not uploads:
        raise OptionError("a content image (or several, or a video) is needed", field="content")
    if any(is_video(data) for data in uploads):
        if len(uploads) != 1:
            raise OptionError("a job takes one video, and no photos beside it", field="content")
        video_limits = VideoLimits(
            max_frames=settings.max_video_frames,
            max_seconds=settings.max_video_seconds,
            max_pixels=settings.max_image_pixels,
        )
        return [(uploads[0], probe_video(uploads[0], video_limits))]
    if len(uploads) > settings.max_batch_photos:
        raise OptionError(
            f"{len(uploads)} content photos; at most {settings.max_batch_photos} per job",
            field="content",
        )
    return [probe_image(data, name="content", **limits) for data in uploads]
