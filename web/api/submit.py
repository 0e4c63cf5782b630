"""Submitting jobs: a new one, or a finished one run again; idempotency, result reuse,
routing to a queue that can hold it."""

from __future__ import annotations

from typing import Any

from flask import (
    Response,
    current_app,
    jsonify,
    request,
    url_for,
)
from sqlalchemy import ColumnElement, Uuid, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.errors import IdempotencyConflict, OptionError, RateLimited
from shared.jobs import (
    JobRequest,
    Upload,
    create_job,
    parse_request,
    request_again,
)
from shared.models import (
    Job,
    JobKind,
    JobMode,
    JobStatus,
    LossPoint,
    utcnow,
)
from shared.parts import parts_of
from shared.routing import choose_queue
from web.api import bp
from web.api.access import check_rate, client_id
from web.api.jobs import check_not_expired
from web.api.reads import live_workers, load_job, offered_backbones
from web.api.serialize import job_json
from web.auth import current_principal
from web.extensions import services
from web.uploads import guarded_upload


def route(job_request: JobRequest, workers: list[dict[str, Any]]) -> tuple[str, int]:
    """The queue for this job and the memory it needs (shared/routing.py); refused with
    ``job_too_large`` when no live worker could hold it. With no worker known, the base
    queue, which every worker consumes."""
    need = job_request.memory_bytes()
    return choose_queue(services.settings.queue, need, workers), need


def _idempotency_key() -> str | None:
    """The client's key, scoped to its owner: two owners' equal keys are different keys
    (one cannot block or reach the other's job by guessing them)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not (0 < len(key) <= 150 and key.isprintable()):
        raise OptionError("must be 1 to 150 printable characters", field="Idempotency-Key")
    return f"{current_principal().scope}|{key}"


def _replay(job: Job, fingerprint: str) -> tuple[Response, int, dict[str, str]]:
    """The answer to a request repeated with its Idempotency-Key."""
    if job.request_fingerprint != fingerprint or not _same_scope(job):
        raise IdempotencyConflict(
            "this Idempotency-Key was used for a different request", field="Idempotency-Key"
        )
    return jsonify(job_json(job)), 200, {"Location": url_for("api.get_job", job_id=str(job.id))}


def _in_scope() -> list[ColumnElement[bool]]:
    """The caller's own jobs: its owner's, else (anonymous) its address's."""
    principal = current_principal()
    if principal.owner is not None:
        return [Job.owner == principal.owner]
    return [Job.owner.is_(None), Job.client == principal.bucket]


def _same_scope(job: Job) -> bool:
    principal = current_principal()
    if principal.owner is not None:
        return job.owner == principal.owner
    return job.owner is None and job.client == principal.bucket


def _reuse_result(session: Session, job: Job, source: Job) -> None:
    """Make ``job`` a finished copy of ``source``: same result file, same loss curve."""
    now = utcnow()
    job.status, job.started_at, job.finished_at = JobStatus.SUCCEEDED, now, now
    job.reused_from = source.id
    job.iteration, job.elapsed = source.iteration, source.elapsed
    job.loss_total, job.loss_content = source.loss_total, source.loss_content
    job.loss_style, job.loss_tv = source.loss_style, source.loss_tv
    job.result_key, job.preview_key = source.result_key, source.preview_key
    job.preview_iteration, job.preview_source = source.preview_iteration, source.preview_source
    session.flush()
    columns = ("iteration", "total", "content", "style", "tv", "temporal", "elapsed")
    copied = select(literal(job.id, Uuid), *(getattr(LossPoint, c) for c in columns)).where(
        LossPoint.job_id == source.id
    )
    session.execute(insert(LossPoint).from_select(["job_id", *columns], copied))


@bp.post("/api/jobs")
def submit_job() -> tuple[Response, int, dict[str, str]]:
    key = _idempotency_key()
    check_rate("submit", services.settings.submit_limit_per_minute)
    with guarded_upload():  # the body is read here: stalls, time and places bounded
        form = {name: request.form.getlist(name) for name in request.form}
        parts = [(field, part) for field in request.files for part in request.files.getlist(field)]
    with services.submission_slots:
        uploads = []
        for field, part in parts:
            try:
                if part.filename:
                    uploads.append(Upload(field, part.filename, part.read()))
            finally:
                part.close()
        return _submit(form, uploads, key)


def _submit(
    form: dict[str, list[str]], uploads: list[Upload], key: str | None
) -> tuple[Response, int, dict[str, str]]:
    """Check, store and enqueue a submission (or replay or reuse an earlier one)."""
    workers = live_workers()
    job_request = parse_request(
        form, uploads, services.settings, offered_backbones(workers),
        decode_slots=services.decode_slots,
    )  # fmt: skip
    fingerprint = job_request.fingerprint()
    session = services.session
    if key is not None:
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is not None:
            return _replay(existing, fingerprint)
    source = None
    if job_request.reuse and job_request.seed_given:  # a fixed seed: the same image again
        source = session.scalar(
            select(Job)
            .where(
                Job.request_fingerprint == fingerprint,
                Job.status == JobStatus.SUCCEEDED,
                Job.result_key.is_not(None),
                Job.expired_at.is_(None),
                # Only one's own results, in open mode too: reuse must not reveal that
                # someone else submitted the same images, nor hand out their job's id (and
                # with it its callback URL).
                *_in_scope(),
            )
            .order_by(Job.finished_at.desc())
            .limit(1)
        )
    queue, memory_bytes = None, None
    fast = job_request.mode == JobMode.FAST
    if source is None and fast:  # the preview workers' queue: no backbone, little memory
        queue = services.settings.preview_queue
    elif source is None:  # it will run: somewhere must hold it (before anything is stored)
        queue, memory_bytes = route(job_request, workers)
    if source is None:
        queued = session.scalar(
            select(func.count()).where(
                Job.client == client_id(), Job.status == JobStatus.QUEUED, Job.parent_id.is_(None)
            )
        )
        if (queued or 0) >= services.settings.max_queued_per_client:
            raise RateLimited(
                f"{queued} of your jobs are queued already; the limit is "
                f"{services.settings.max_queued_per_client}",
                retry_after=30,
            )
    job = create_job(session, services.storage, job_request)
    job.idempotency_key, job.request_fingerprint = key, fingerprint
    parts = parts_of(session, job)
    for each in (job, *parts):
        each.client, each.owner = client_id(), current_principal().owner
        each.queue, each.memory_bytes = queue, memory_bytes
    if parts:  # a parent is never sent to a worker: its parts are
        job.queue = None
    if source is not None:
        _reuse_result(session, job, source)
    try:
        session.commit()
    except IntegrityError:  # the same key, sent twice at once: the first one won
        session.rollback()
        existing = session.scalar(select(Job).where(Job.idempotency_key == key))
        if existing is None:
            raise
        return _replay(existing, fingerprint)
    location = {"Location": url_for("api.get_job", job_id=str(job.id))}
    if source is not None:
        return jsonify(job_json(job)), 201, location
    assert queue is not None
    try:
        if services.settings.fast_previews and not fast:
            # First: the preview workers are idle far more often than the job's queue. A
            # video's is the feed-forward video; a batch's, each photo's picture.
            for each in parts if job.job_kind == JobKind.BATCH else [job]:
                services.enqueue_preview(str(each.id))
        for each in parts or [job]:
            services.enqueue(str(each.id), queue)
            each.enqueued_at = utcnow()
        job.enqueued_at = utcnow()
        session.commit()
    except Exception:
        # The broker is away: the job is safe in the database, queued, and the workers'
        # reconciler sends its message once Redis answers again.
        current_app.logger.warning("could not enqueue job %s; the reconciler will", job.id)
    return jsonify(job_json(job)), 202, location


@bp.post("/api/jobs/<job_id>/again")
def run_again(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """A new job on this job's images and options, with the options in the form changed
    (e.g. ``style_strength``); answered as a submission is."""
    key = _idempotency_key()
    check_rate("submit", services.settings.submit_limit_per_minute)
    job = load_job(job_id)
    check_not_expired(job)
    changes = {name: request.form.getlist(name) for name in request.form}
    form, uploads = request_again(job, services.storage, changes)
    return _submit(form, uploads, key)
