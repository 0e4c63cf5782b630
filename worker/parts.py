"""A batch's or video's end: when its parts have ended, put its result together (a zip and
a contact sheet; an MP4 with the seams blended) and end it. No torch here: the worker that
ends the last part calls :func:`part_ended`, and the reconciler :func:`settle_waiting` for a
parent whose assembler died.

A part's failure fails its parent at once and cancels the parts still going: a batch or
video is delivered whole or not at all.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from PIL import Image, ImageDraw, ImageOps
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from shared import broker, feed
from shared.config import Settings
from shared.images import encode_png
from shared.models import PARENT_KINDS, Job, JobKind, JobStatus, StoredImage, utcnow
from shared.parts import FrameRun, VideoMedia, batch_item_name, load_frame, parts_of
from shared.storage import Storage
from shared.video import encode_mp4
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)

#: How long an assembly may hold its parent before another worker may take it over.
ASSEMBLY_LEASE_SECONDS = 600.0
#: The contact sheet's cell: each photo above its picture.
SHEET_CELL = 256


def part_ended(
    sessions: sessionmaker[Session], storage: Storage, redis: Any, settings: Settings,
    part_id: uuid.UUID,
) -> None:  # fmt: skip
    """After a part's end was recorded: end its parent if this was the last part (or a
    failure)."""
    with sessions.begin() as session:
        parent_id = session.scalar(select(Job.parent_id).where(Job.id == part_id))
    if parent_id is not None:
        settle(sessions, storage, redis, settings, parent_id)


def settle(
    sessions: sessionmaker[Session], storage: Storage, redis: Any, settings: Settings,
    parent_id: uuid.UUID,
) -> None:  # fmt: skip
    """End the parent if its parts allow: failed at a part's failure (the others canceled),
    canceled when all ended and one was canceled, else its result put together."""
    owner = f"assemble/{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        parent = session.get(Job, parent_id)
        if parent is None or parent.job_status.finished:
            return
        parts = parts_of(session, parent)
        failed = next((p for p in parts if p.job_status == JobStatus.FAILED), None)
        if failed is not None:
            _cancel_rest(session, redis, parts)
            number = (failed.part_index or 0) + 1
            message = f"part {number} of {len(parts)} failed: {failed.error_message}"
            parent.status, parent.finished_at = JobStatus.FAILED, utcnow()
            parent.error_code, parent.error_message = failed.error_code, message
            status = parent.status
        elif not all(p.job_status.finished for p in parts):
            return
        elif any(p.job_status == JobStatus.CANCELED for p in parts):
            parent.status, parent.finished_at = JobStatus.CANCELED, utcnow()
            status = parent.status
        else:
            status = None
    if status is not None:
        feed.publish(redis, parent_id, status=status)
        _callback(sessions, settings, parent_id)
        return
    if not _take(sessions, parent_id, owner):
        return  # another worker assembles it
    try:
        key = assemble(sessions, storage, parent_id)
    except Exception:
        log.exception("job %s: putting its parts together failed", parent_id)
        message = "putting the parts together failed; the operators' log has why"
        _end(sessions, redis, parent_id, owner, JobStatus.FAILED,
             error_code="internal_error", error_message=message)  # fmt: skip
    else:
        _end(sessions, redis, parent_id, owner, JobStatus.SUCCEEDED, result_key=key)
    _callback(sessions, settings, parent_id)


def _callback(sessions: sessionmaker[Session], settings: Settings, parent_id: uuid.UUID) -> None:
    """The parent's callback now, on a thread of its own (the reconciler retries it)."""
    threading.Thread(target=_deliver, args=(sessions, settings, parent_id), daemon=True).start()


def _deliver(sessions: sessionmaker[Session], settings: Settings, parent_id: uuid.UUID) -> None:
    try:
        deliver_due(sessions, settings, parent_id)
    except Exception as error:
        log.warning("callback of job %s: %s; the reconciler will retry", parent_id, error)


def settle_waiting(
    sessions: sessionmaker[Session], storage: Storage, redis: Any, settings: Settings
) -> int:
    """The reconciler's pass: parents not ended whose parts all have (their assembler
    died, or a part ended while the database was away). Returns how many it looked at."""
    now = utcnow()
    part = aliased(Job)
    with sessions.begin() as session:
        waiting = session.scalars(
            select(Job.id).where(
                Job.kind.in_(PARENT_KINDS),
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
                ~select(part.id)
                .where(
                    part.parent_id == Job.id,
                    part.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                )
                .exists(),
            )
        ).all()
    for parent_id in waiting:
        settle(sessions, storage, redis, settings, parent_id)
    return len(waiting)


def _cancel_rest(session: Session, redis: Any, parts: list[Job]) -> None:
    for part in parts:
        if part.job_status.finished:
            continue
        part.cancel_requested = True
        if part.job_status == JobStatus.QUEUED:
            part.status, part.finished_at = JobStatus.CANCELED, utcnow()
        else:
            broker.request_cancel(redis, str(part.id))


def _take(sessions: sessionmaker[Session], parent_id: uuid.UUID, owner: str) -> bool:
    now = utcnow()
    with sessions.begin() as session:
        taken = session.execute(
            update(Job)
            .where(
                Job.id == parent_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                or_(Job.lease_owner.is_(None), Job.lease_expires_at < now),
            )
            .values(
                status=JobStatus.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=ASSEMBLY_LEASE_SECONDS),
            )
        )
        return bool(taken.rowcount)  # type: ignore[attr-defined]


def _end(
    sessions: sessionmaker[Session], redis: Any, parent_id: uuid.UUID, owner: str,
    status: JobStatus, **values: Any,
) -> None:  # fmt: skip
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == parent_id, Job.lease_owner == owner)
            .values(status=status, finished_at=utcnow(), lease_expires_at=None, **values)
        )
    feed.publish(redis, parent_id, status=status.value)
    log.info("job %s: %s", parent_id, status.value)


def assemble(sessions: sessionmaker[Session], storage: Storage, parent_id: uuid.UUID) -> str:
    """Put a finished parent's result together and store it; its storage key."""
    with sessions.begin() as session:
        parent = session.get(Job, parent_id)
        assert parent is not None
        parts = [
            (p.id, p.result_key, p.content_sha256, p.frames) for p in parts_of(session, parent)
        ]
        kind, media = parent.job_kind, parent.media
        source = session.get(StoredImage, parent.content_sha256)
        assert source is not None
        contents = {
            sha: stored.storage_key
            for sha in {sha for _, _, sha, _ in parts}
            if (stored := session.get(StoredImage, sha)) is not None
        }
        source_key = source.storage_key
    if kind == JobKind.VIDEO:
        assert media is not None
        video = VideoMedia.of_job(media)
        runs = [(part_id, FrameRun.of_job(frames)) for part_id, _, _, frames in parts]
        data = encode_mp4(
            video_frames(storage, runs, video.frames), video.frame_rate,
            audio_from=storage.get(source_key) if video.audio else None,
        )  # fmt: skip
        key = f"jobs/{parent_id}/result.mp4"
        storage.put(key, data)
        return key
    pictures = [storage.get(str(result)) for _, result, _, _ in parts]
    photos = [storage.get(contents[sha]) for _, _, sha, _ in parts]
    sheet = contact_sheet(photos, pictures)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs: compressed
        for index, picture in enumerate(pictures):
            archive.writestr(batch_item_name(index), picture)
        archive.writestr("contact-sheet.png", sheet)
    key = f"jobs/{parent_id}/result.zip"
    storage.put(key, buffer.getvalue())
    storage.put(f"jobs/{parent_id}/sheet.png", sheet)
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == parent_id).values(preview_key=f"jobs/{parent_id}/sheet.png")
        )
    return key


def seam_weight(index: int, run_start: int, overlap: int) -> float:
    """How much of a seam frame comes from the later run: frames ``run_start - overlap`` to
    ``run_start - 1`` are made by both runs, and move linearly from the earlier run's
    picture to the later run's."""
    return (index - (run_start - overlap) + 1) / (overlap + 1)


def video_frames(
    storage: Storage, runs: list[tuple[uuid.UUID, FrameRun]], frames: int
) -> Iterator[Image.Image]:
    """The video's stylized frames in order, one at a time; at each seam, the two runs'
    pictures of the same frame blended (:func:`seam_weight`)."""
    for index in range(frames):
        owner = next(r for r, (_, run) in enumerate(runs) if run.start <= index < run.stop)
        part_id, _ = runs[owner]
        picture = load_frame(storage, part_id, index)
        if owner + 1 < len(runs):
            later_id, later = runs[owner + 1]
            if later.first <= index:
                weight = seam_weight(index, later.start, later.overlap)
                other = load_frame(storage, later_id, index).resize(picture.size)
                picture = Image.blend(picture, other, weight)
        yield picture


def contact_sheet(photos: list[bytes], pictures: list[bytes]) -> bytes:
    """Each photo above its picture, in a row, thumbnails of :data:`SHEET_CELL` px."""
    cell = SHEET_CELL
    sheet = Image.new("RGB", (cell * len(pictures), cell * 2), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (photo, picture) in enumerate(zip(photos, pictures, strict=True)):
        for row, data in enumerate((photo, picture)):
            with Image.open(io.BytesIO(data)) as image:
                # Photo and picture at one scale, up or down: they fill the cell alike.
                thumb = ImageOps.contain(image.convert("RGB"), (cell - 8, cell - 24))
            x = column * cell + (cell - thumb.width) // 2
            y = row * cell + 16 + (cell - 16 - thumb.height) // 2
            sheet.paste(thumb, (x, y))
        draw.text((column * cell + 4, 4), batch_item_name(column), fill="black")
    return encode_png(sheet)
