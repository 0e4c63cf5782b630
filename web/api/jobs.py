"""A job's resources: its status, losses, result, preview, inputs, cancel; the list of
jobs; the estimate of one not yet submitted."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from flask import (
    Response,
    jsonify,
    request,
)
from sqlalchemy import and_, or_, select

from shared import broker, feed
from shared.errors import Conflict, Expired, Forbidden, NotFound, OptionError
from shared.estimate import estimate, job_work
from shared.models import (
    Job,
    JobKind,
    JobMode,
    JobStatus,
    LossPoint,
    StoredImage,
    utcnow,
)
from shared.options import DEFAULTS, MODE_CHOICES
from shared.parts import parts_of
from shared.pyramid import MAX_SCALES, MIN_SIZE, plan_for
from shared.queue import queue_ahead
from web.api import bp
from web.api.reads import (
    MAX_LOSS_PAGE,
    int_arg,
    load_job,
    read_job,
    worker_speeds,
)
from web.api.serialize import iso, job_json, point_json
from web.auth import listed, may_change
from web.extensions import services


def check_not_expired(job: Job) -> None:
    if job.expired_at is not None:
        raise Expired(
            f"the job's files were deleted at {iso(job.expired_at)}, its time to live over"
        )


@bp.get("/api/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    job, styles, runs, ahead = read_job(job_id)
    return jsonify(job_json(job, styles, runs, ahead=ahead))


@bp.get("/api/jobs/<job_id>/losses")
def get_losses(job_id: str) -> Response:
    job = load_job(job_id)
    after = int_arg("after", 0, 0, 10**9)
    limit = int_arg("limit", 1000, 1, MAX_LOSS_PAGE)
    points = services.session.scalars(
        select(LossPoint)
        .where(LossPoint.job_id == job.id, LossPoint.iteration > after)
        .order_by(LossPoint.iteration)
        .limit(limit)
    ).all()
    return jsonify({"job": str(job.id), "points": [point_json(p) for p in points]})


@bp.get("/api/jobs/<job_id>/result")
def get_result(job_id: str) -> Response:
    job = load_job(job_id)
    check_not_expired(job)
    if job.job_status != JobStatus.SUCCEEDED or not job.result_key:
        raise Conflict(f"the job is {job.status}; the result exists once it has succeeded")
    data = services.storage.get(job.result_key)
    extension, mimetype = RESULT_TYPES[job.job_kind]
    disposition = "attachment" if extension == "zip" else "inline"
    headers = {"Content-Disposition": f'{disposition}; filename="stylequeue-{job.id}.{extension}"'}
    return Response(data, mimetype=mimetype, headers=headers)


#: What a job's result is, by its kind: a run of frames' is its last frame.
RESULT_TYPES = {
    JobKind.PICTURE: ("png", "image/png"),
    JobKind.FRAMES: ("png", "image/png"),
    JobKind.BATCH: ("zip", "application/zip"),
    JobKind.VIDEO: ("mp4", "video/mp4"),
}


@bp.get("/api/jobs/<job_id>/preview")
def get_preview(job_id: str) -> Response:
    job = load_job(job_id)
    check_not_expired(job)
    if not job.preview_key or not services.storage.exists(job.preview_key):
        raise NotFound("no preview yet")
    # A video's preview is its feed-forward video; a batch's, its contact sheet.
    mimetype = "video/mp4" if job.preview_key.endswith(".mp4") else "image/png"
    return Response(
        services.storage.get(job.preview_key),
        mimetype=mimetype,
        headers={"Cache-Control": "no-store"},
    )


@bp.get("/api/jobs/<job_id>/content")
def get_content(job_id: str) -> Response:
    """The job's content photo, as it was uploaded."""
    job = load_job(job_id)
    return _stored_image(job, job.content_sha256)


@bp.get("/api/jobs/<job_id>/styles/<int:position>")
def get_style(job_id: str, position: int) -> Response:
    """One of the job's style images, as it was uploaded (or the preset's file)."""
    job = load_job(job_id)
    style = next((s for s in job.styles if s.position == position), None)
    if style is None:
        raise NotFound(f"the job has no style {position}")
    return _stored_image(job, style.image_sha256)


#: The formats the service accepts, by their first bytes (shared/images.py ACCEPTED_FORMATS,
#: shared/video.py CONTAINERS).
IMAGE_SIGNATURES = (
    (b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"RIFF", "image/webp"),
    (b"GIF8", "image/gif"), (b"\x1a\x45\xdf\xa3", "video/webm"),
)  # fmt: skip


def _stored_image(job: Job, digest: str) -> Response:
    check_not_expired(job)
    stored = services.session.get(StoredImage, digest)
    if stored is None or not services.storage.exists(stored.storage_key):
        raise NotFound("the image is gone")
    data = services.storage.get(stored.storage_key)
    mimetype = next((m for magic, m in IMAGE_SIGNATURES if data.startswith(magic)), None)
    if mimetype is None and data[4:8] == b"ftyp":
        mimetype = "video/mp4"
    # Stored by its hash: the bytes behind the URL never change.
    headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return Response(data, mimetype=mimetype or "application/octet-stream", headers=headers)


@bp.post("/api/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> tuple[Response, int]:
    """Idempotent: a queued job is canceled at once, a running one within an iteration."""
    job = load_job(job_id)
    if not may_change(job):
        raise Forbidden("only the job's owner may cancel it")
    session = services.session
    if job.job_status.finished:
        return jsonify(job_json(job)), 200
    canceled = []
    for each in [job, *parts_of(session, job)]:  # a batch or video: every part too
        if each.job_status.finished:
            continue
        broker.request_cancel(services.redis, str(each.id))
        each.cancel_requested = True
        # A queued job (and a parent: it runs nowhere) is canceled now.
        if each.job_status == JobStatus.QUEUED or each.job_kind.has_parts:
            each.status, each.finished_at = JobStatus.CANCELED, utcnow()
            canceled.append(each.id)
    session.commit()
    for each_id in canceled:  # committed: now its watchers (a running job's worker tells them)
        feed.publish(services.redis, each_id, status=JobStatus.CANCELED.value)
    return jsonify(job_json(job)), 202


def _encode_cursor(job: Job) -> str:
    raw = f"{iso(job.created_at)}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        moment, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(moment), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise OptionError("not a cursor this API gave out", field="cursor") from None


@bp.get("/api/jobs")
def list_jobs() -> Response:
    limit = int_arg("limit", 20, 1, 100)
    query = (
        listed(select(Job).where(Job.parent_id.is_(None)))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit + 1)
    )
    status = request.args.get("status")
    if status:
        if status not in {s.value for s in JobStatus}:
            raise OptionError(
                f"must be one of {', '.join(s.value for s in JobStatus)}", field="status"
            )
        query = query.where(Job.status == status)
    cursor = request.args.get("cursor")
    if cursor:
        moment, job_id = _decode_cursor(cursor)
        if services.session.get_bind().dialect.name == "sqlite":
            moment = moment.replace(tzinfo=None)
        query = query.where(
            or_(Job.created_at < moment, and_(Job.created_at == moment, Job.id < job_id))
        )
    jobs = services.session.scalars(query).all()
    page, more = jobs[:limit], len(jobs) > limit
    return jsonify(
        {
            "jobs": [job_json(job, with_position=False) for job in page],
            "next_cursor": _encode_cursor(page[-1]) if more else None,
        }
    )


@bp.get("/api/estimate")
def get_estimate() -> Response:
    """How long a job of these options would take now: its run on the live workers'
    measured speed, and the wait for the work queued ahead of it (shared/estimate.py)."""
    settings = services.settings
    size = int_arg("size", DEFAULTS.size, MIN_SIZE, settings.max_size)
    iterations = int_arg("iterations", DEFAULTS.iterations, 1, settings.max_iterations)
    scales = int_arg("scales", 0, 0, MAX_SCALES) or None
    width = int_arg("width", size, 1, 1_000_000)
    height = int_arg("height", size, 1, 1_000_000)
    mode = request.args.get("mode") or JobMode.OPTIMIZE.value
    if mode not in MODE_CHOICES:
        raise OptionError(f"must be one of {', '.join(MODE_CHOICES)}", field="mode")
    plan = plan_for(size, scales, iterations)
    with services.reader.connect() as connection:
        _, work_ahead = queue_ahead(connection, utcnow())
    expected = estimate(
        worker_speeds(),
        work=job_work(plan, width, height),
        work_ahead=work_ahead,
        fast=mode == JobMode.FAST,
    )
    return jsonify(expected)
