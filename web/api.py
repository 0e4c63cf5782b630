"""The JSON API: submit, poll, stream, cancel and fetch jobs."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import redis
from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    request,
    stream_with_context,
    url_for,
)
from sqlalchemy import Row, Uuid, and_, bindparam, func, insert, literal, or_, select, text, true
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, joinedload
from werkzeug.exceptions import HTTPException

from shared import broker
from shared.errors import OptionError, StylequeueError
from shared.estimate import RATE_FIELD, Speeds, estimate, job_work, remaining_fraction
from shared.jobs import (
    JobRequest,
    Upload,
    create_job,
    parse_request,
    queue_ahead,
    request_again,
    scale_plan,
)
from shared.options import DEFAULTS, MAX_SCALES, MIN_SIZE, MODE_CHOICES, plan_for
from shared.models import (
    PREVIEW_OPTIMIZER,
    Job,
    JobMode,
    JobRun,
    JobStatus,
    JobStyle,
    LossPoint,
    StoredImage,
    utcnow,
)
from shared.presets import presets
from shared.routing import choose_queue
from shared.webhooks import owner_secret
from web.auth import (
    Forbidden,
    Unauthorized,
    current_principal,
    listed,
    may_change,
    may_see,
    require_access,
)
from web.extensions import services
from web.openapi import openapi_document

bp = Blueprint("api", __name__)
log = logging.getLogger(__name__)

#: How often the event stream looks for news in the database.
EVENT_POLL_SECONDS = 0.25
#: An idle event stream sends a comment this often: proxies keep it open, and a client
#: that has left is noticed (the write fails), which frees its thread.
KEEP_ALIVE_SECONDS = 5
#: When a client refused an event stream (every place taken) may ask again.
STREAMS_BUSY_RETRY_SECONDS = 10
MAX_LOSS_PAGE = 10_000
DATABASE_RETRY_AFTER_SECONDS = 5


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "field": field}})
    response.status_code = status
    return response


@bp.app_errorhandler(StylequeueError)
def _user_error(error: StylequeueError) -> Response:
    return error_response(error.http_status, error.code, error.message, error.field)


@bp.app_errorhandler(DBAPIError)
def _database_down(error: DBAPIError) -> Response:
    """The database is unreachable: ask the client to come back, never a 500."""
    if not error.connection_invalidated and not isinstance(
        error, OperationalError | InterfaceError
    ):
        raise error
    current_app.logger.warning("database unavailable: %s", error.orig)
    services.session.rollback()
    response = error_response(503, "database_unavailable", "the database is unreachable; retry")
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


@bp.app_errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response | HTTPException:
    if not request.path.startswith("/api/"):
        return error
    code = {413: "request_too_large"}.get(error.code or 500, (error.name or "error").lower())
    return error_response(error.code or 500, code.replace(" ", "_"), error.description or "")


class RetryLater(StylequeueError):
    """Refused for now: the answer says when to come back (``Retry-After``, seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    code = "rate_limited"
    http_status = 429


class StreamsBusy(RetryLater):
    code = "streams_busy"
    http_status = 503


@bp.app_errorhandler(RetryLater)
def _retry_later(error: RetryLater) -> Response:
    response = error_response(error.http_status, error.code, error.message)
    response.headers["Retry-After"] = str(error.retry_after)
    return response


@bp.app_errorhandler(Unauthorized)
def _unauthorized(error: Unauthorized) -> Response:
    response = error_response(401, error.code, error.message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="stylequeue"'
    return response


def client_id() -> str:
    """Whose limits apply: the token's, else the client's address (behind a reverse proxy,
    configure werkzeug's ProxyFix so that this is the real client)."""
    return current_principal().bucket


def check_rate(bucket: str, limit: int) -> None:
    """A fixed one-minute window per client, counted with the other web processes through
    Redis (web/ratelimit.py); open when Redis is away."""
    if limit <= 0:
        return
    now = time.time()
    window = int(now // 60)
    key = f"stylequeue:rate:{bucket}:{client_id()}:{window}"
    try:
        count = services.window_counts.hit(key, window=window, limit=limit, ttl_seconds=120)
    except redis.RedisError:
        return  # the broker is away (or refuses even INCRBY): stay open
    if count > limit:
        retry_after = 60 - int(now) % 60
        raise RateLimited(f"more than {limit} {bucket} requests a minute; retry later", retry_after)


@bp.before_app_request
def _authenticate_and_limit() -> None:
    if request.path.startswith("/api/"):
        require_access()
        check_rate("api", services.settings.rate_limit_per_minute)


def job_links(job: Job | Row[Any]) -> dict[str, str]:
    job_id = str(job.id)
    # The job's API routes all sit under its own URL: one url_for instead of six (each
    # builds the URL through werkzeug's router; together a tenth of a status poll).
    own = url_for("api.get_job", job_id=job_id)
    return {
        "self": own,
        "page": url_for("pages.job_page", job_id=job_id),
        "result": f"{own}/result",
        "preview": f"{own}/preview",
        "losses": f"{own}/losses",
        "events": f"{own}/events",
        "cancel": f"{own}/cancel",
        "again": f"{own}/again",
        "content": f"{own}/content",
    }


def job_json(
    job: Job | Row[Any],
    styles: Sequence[JobStyle | SimpleNamespace] | None = None,
    runs: Sequence[JobRun | SimpleNamespace] | None = None,
    *,
    with_position: bool = True,
    ahead: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """The job as the API shows it: from an ORM ``Job`` (its styles and runs loaded with
    it), or from the rows :func:`read_job` gives the status poll. A queued job's position
    and the work ahead of it (``ahead``) are counted here unless given."""
    if styles is None or runs is None:
        assert isinstance(job, Job), "rows come with their styles and runs"
        styles, runs = job.styles, job.runs
    status = JobStatus(job.status)
    links = job_links(job)
    fast = job.mode == JobMode.FAST
    eta, wait = None, None
    if status == JobStatus.RUNNING and job.iteration and job.elapsed:
        eta, wait = _running_eta(job), 0.0
    if status == JobStatus.QUEUED and with_position:
        if ahead is None:
            ahead = queue_ahead(services.session, job.created_at)
        expected = estimate(
            Speeds.from_heartbeats(live_workers()), work=job.work or 0, work_ahead=ahead[1],
            fast=fast,
        )  # fmt: skip
        eta, wait = expected["total_seconds"], expected["wait_seconds"]
    body: dict[str, Any] = {
        "id": str(job.id),
        "status": status.value,
        "mode": job.mode,
        "params": {**job.params, "style_weights": [s.weight for s in styles]},
        "styles": [
            {"image": s.image_sha256, "weight": s.weight, "preset": s.preset} for s in styles
        ],
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "progress": {"iteration": job.iteration, "total": job.total},
        "eta_seconds": eta,
        "wait_seconds": wait,
        "scales": [] if fast else scale_plan(job.params),
        "preview": None
        if job.preview_key is None
        else {
            "url": links["preview"],
            "source": job.preview_source or PREVIEW_OPTIMIZER,
            "iteration": job.preview_iteration,
        },
        "loss": None
        if job.loss_total is None
        else {
            "total": job.loss_total,
            "content": job.loss_content,
            "style": job.loss_style,
            "tv": job.loss_tv,
        },
        "attempts": job.attempts,
        "resumed_from_iteration": job.resumed_from_iteration,
        "reused_from": str(job.reused_from) if job.reused_from else None,
        "expired_at": iso(job.expired_at),
        "worker": job.worker,
        "device": job.device,
        "queue": job.queue,
        "runs": [
            {
                "attempt": run.attempt,
                "host": run.host,
                "worker": run.worker,
                "device": run.device,
                "queue": run.queue,
                "resumed_from_iteration": run.resumed_from_iteration,
                "started_at": iso(run.started_at),
                "ended_at": iso(run.ended_at),
                "outcome": run.outcome,
            }
            for run in runs
        ],
        "cancel_requested": job.cancel_requested,
        "links": {**links, "styles": [f"{links['self']}/styles/{s.position}" for s in styles]},
    }
    if ahead is not None:
        body["queue_position"] = ahead[0]
    if status == JobStatus.FAILED:
        body["error"] = {"code": job.error_code, "message": job.error_message}
    if job.callback_url:
        body["callback"] = {
            "url": job.callback_url,
            "attempts": job.callback_attempts,
            "delivered_at": iso(job.callback_delivered_at),
            "next_attempt_at": iso(job.callback_next_at),
            "error": job.callback_error,
        }
    return body


def _running_eta(job: Job | Row[Any]) -> float:
    """Seconds left: the job's remaining work at its worker's measured speed (its first
    iterations' time holds the run's setup, which would inflate the rest tenfold), else at
    the speed of its own iterations so far."""
    plan = [(s["size"], s["iterations"]) for s in scale_plan(job.params)]
    rate = None
    if job.work and plan and job.worker:
        try:
            raw = services.redis.get(broker.WORKER_PREFIX + job.worker)
            rate = json.loads(raw).get(RATE_FIELD) if raw else None
        except redis.RedisError:
            rate = None
    if isinstance(rate, int | float) and rate > 0:
        return round(job.work * remaining_fraction(plan, job.iteration) / rate, 1)
    return round(job.elapsed / job.iteration * (job.total - job.iteration), 1)


JOB_WITH_STYLES_AND_RUNS = (joinedload(Job.styles), joinedload(Job.runs))


def parse_job_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job {job_id!r}") from None


def load_job(job_id: str) -> Job:
    key = parse_job_id(job_id)
    # One statement for the job, its styles and its runs, not three separate ORM loads.
    job = services.session.get(Job, key, options=JOB_WITH_STYLES_AND_RUNS)
    if job is None or not may_see(job):  # another's job: as if it did not exist
        raise NotFound(f"no job {job_id!r}")
    return job


# The status poll reads with Core: one cached statement on a pooled connection, no Session
# and no ORM objects. The ORM load above is a large share of a poll's CPU time under
# gunicorn (py-spy; bench/api.py). The job's row comes once per pair of its styles and
# runs (a few at most), as from the ORM's joined load; on PostgreSQL, one round trip
# instead of three.
jobs_table, styles_table, runs_table = Job.__table__, JobStyle.__table__, JobRun.__table__
STYLE_FIELDS = [c.name for c in styles_table.c if c.name != "job_id"]
RUN_FIELDS = [c.name for c in runs_table.c if c.name != "job_id"]
JOB_STYLE_RUN_ROWS = (
    select(
        jobs_table,
        *(styles_table.c[name].label(f"style_{name}") for name in STYLE_FIELDS),
        *(runs_table.c[name].label(f"run_{name}") for name in RUN_FIELDS),
    )
    .outerjoin(styles_table, styles_table.c.job_id == jobs_table.c.id)
    .outerjoin(runs_table, runs_table.c.job_id == jobs_table.c.id)
    .where(jobs_table.c.id == bindparam("job_id"))
    .order_by(styles_table.c.position, runs_table.c.attempt)
)


def _distinct_parts(
    rows: Sequence[Row[Any]], prefix: str, fields: list[str], key: str
) -> list[SimpleNamespace]:
    """The distinct ``prefix``-labelled parts of ``rows`` (by ``key``), in their order."""
    parts: dict[Any, SimpleNamespace] = {}
    for row in rows:
        values = row._mapping
        identity = values[prefix + key]
        if identity is not None and identity not in parts:
            parts[identity] = SimpleNamespace(**{name: values[prefix + name] for name in fields})
    return list(parts.values())


def read_job(
    job_id: str,
) -> tuple[Row[Any], list[SimpleNamespace], list[SimpleNamespace], tuple[int, float] | None]:
    """A job the caller may see (its row), its styles, its runs and, while it is queued,
    its queue position and the work ahead of it, read-only."""
    with services.reader.connect() as connection:
        rows = connection.execute(JOB_STYLE_RUN_ROWS, {"job_id": parse_job_id(job_id)}).all()
        # may_see reads no database here: the caller was authenticated before the view.
        if not rows or not may_see(rows[0]):
            raise NotFound(f"no job {job_id!r}")
        job = rows[0]
        ahead = None
        if job.status == JobStatus.QUEUED:
            ahead = queue_ahead(connection, job.created_at)
    return (
        job,
        _distinct_parts(rows, "style_", STYLE_FIELDS, "position"),
        _distinct_parts(rows, "run_", RUN_FIELDS, "attempt"),
        ahead,
    )


class NotFound(StylequeueError):
    code = "not_found"
    http_status = 404


class Conflict(StylequeueError):
    code = "not_ready"
    http_status = 409


def live_workers() -> list[dict[str, Any]]:
    """The workers' heartbeats; none when the broker is away (jobs are not refused for it)."""
    try:
        return broker.live_workers(services.redis)
    except Exception:
        return []


def route(job_request: JobRequest, workers: list[dict[str, Any]]) -> tuple[str, int]:
    """The queue for this job and the memory it needs (shared/routing.py); refused with
    ``job_too_large`` when no live worker could hold it. With no worker known, the base
    queue, which every worker consumes."""
    need = job_request.memory_bytes()
    return choose_queue(services.settings.queue, need, workers), need


class Expired(StylequeueError):
    code = "expired"
    http_status = 410


def _check_not_expired(job: Job) -> None:
    if job.expired_at is not None:
        raise Expired(
            f"the job's files were deleted at {iso(job.expired_at)}, its time to live over"
        )


class IdempotencyConflict(StylequeueError):
    code = "idempotency_key_reused"
    http_status = 409


def _idempotency_key() -> str | None:
    """The client's key, scoped to its owner: two owners' equal keys are different keys
    (one cannot block or reach the other's job by guessing them)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not (0 < len(key) <= 150 and key.isprintable()):
        raise OptionError("must be 1 to 150 printable characters", field="Idempotency-Key")
    return f"{current_principal().owner or ''}|{key}"


def _replay(job: Job, fingerprint: str) -> tuple[Response, int, dict[str, str]]:
    """The answer to a request repeated with its Idempotency-Key."""
    if job.request_fingerprint != fingerprint or job.owner != current_principal().owner:
        raise IdempotencyConflict(
            "this Idempotency-Key was used for a different request", field="Idempotency-Key"
        )
    return jsonify(job_json(job)), 200, {"Location": url_for("api.get_job", job_id=str(job.id))}


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
    columns = ("iteration", "total", "content", "style", "tv", "elapsed")
    copied = select(literal(job.id, Uuid), *(getattr(LossPoint, c) for c in columns)).where(
        LossPoint.job_id == source.id
    )
    session.execute(insert(LossPoint).from_select(["job_id", *columns], copied))


@bp.post("/api/jobs")
def submit_job() -> tuple[Response, int, dict[str, str]]:
    key = _idempotency_key()
    check_rate("submit", services.settings.submit_limit_per_minute)
    form = {name: request.form.getlist(name) for name in request.form}
    uploads = []
    for field in request.files:
        for upload in request.files.getlist(field):
            try:
                if upload.filename:
                    uploads.append(Upload(field, upload.filename, upload.read()))
            finally:
                upload.close()
    return _submit(form, uploads, key)


def _submit(
    form: dict[str, list[str]], uploads: list[Upload], key: str | None
) -> tuple[Response, int, dict[str, str]]:
    """Check, store and enqueue a submission (or replay or reuse an earlier one)."""
    workers = live_workers()
    backbones = {name for worker in workers for name in worker.get("backbones", [])}
    job_request = parse_request(
        form, uploads, services.settings, backbones or None, decode_slots=services.decode_slots
    )
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
                # With tokens, only one's own results: reuse must not reveal that someone
                # else submitted the same images.
                Job.owner == current_principal().owner
                if services.settings.require_token
                else true(),
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
            select(func.count()).where(Job.client == client_id(), Job.status == JobStatus.QUEUED)
        )
        if (queued or 0) >= services.settings.max_queued_per_client:
            raise RateLimited(
                f"{queued} of your jobs are queued already; the limit is "
                f"{services.settings.max_queued_per_client}",
                retry_after=30,
            )
    job = create_job(session, services.storage, job_request)
    job.idempotency_key, job.request_fingerprint = key, fingerprint
    job.client, job.owner = client_id(), current_principal().owner
    job.queue, job.memory_bytes = queue, memory_bytes
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
            # First: the preview workers are idle far more often than the job's queue.
            services.enqueue_preview(str(job.id))
        services.enqueue(str(job.id), queue)
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
    _check_not_expired(job)
    changes = {name: request.form.getlist(name) for name in request.form}
    form, uploads = request_again(job, services.storage, changes)
    return _submit(form, uploads, key)


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


#: The formats the service accepts, by their first bytes (shared/images.py ACCEPTED_FORMATS).
IMAGE_SIGNATURES = ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"RIFF", "image/webp"))


def _stored_image(job: Job, digest: str) -> Response:
    _check_not_expired(job)
    stored = services.session.get(StoredImage, digest)
    if stored is None or not services.storage.exists(stored.storage_key):
        raise NotFound("the image is gone")
    data = services.storage.get(stored.storage_key)
    mimetype = next((m for magic, m in IMAGE_SIGNATURES if data.startswith(magic)), None)
    # Stored by its hash: the bytes behind the URL never change.
    headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return Response(data, mimetype=mimetype or "application/octet-stream", headers=headers)


@bp.get("/api/estimate")
def get_estimate() -> Response:
    """How long a job of these options would take now: its run on the live workers'
    measured speed, and the wait for the work queued ahead of it (shared/estimate.py)."""
    settings = services.settings
    size = _int_arg("size", DEFAULTS.size, MIN_SIZE, settings.max_size)
    iterations = _int_arg("iterations", DEFAULTS.iterations, 1, settings.max_iterations)
    scales = _int_arg("scales", 0, 0, MAX_SCALES) or None
    width = _int_arg("width", size, 1, 1_000_000)
    height = _int_arg("height", size, 1, 1_000_000)
    mode = request.args.get("mode") or JobMode.OPTIMIZE.value
    if mode not in MODE_CHOICES:
        raise OptionError(f"must be one of {', '.join(MODE_CHOICES)}", field="mode")
    plan = plan_for(size, scales, iterations)
    with services.reader.connect() as connection:
        _, work_ahead = queue_ahead(connection, utcnow())
    expected = estimate(
        Speeds.from_heartbeats(live_workers()),
        work=job_work(plan, width, height),
        work_ahead=work_ahead,
        fast=mode == JobMode.FAST,
    )
    return jsonify(expected)


@bp.get("/api/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    job, styles, runs, ahead = read_job(job_id)
    return jsonify(job_json(job, styles, runs, ahead=ahead))


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise OptionError(f"must be a whole number, not {raw!r}", field=name) from None
    if not low <= value <= high:
        raise OptionError(f"must be between {low} and {high}", field=name)
    return value


def point_json(point: LossPoint) -> dict[str, Any]:
    return {
        "iteration": point.iteration,
        "total": point.total,
        "content": point.content,
        "style": point.style,
        "tv": point.tv,
        "elapsed": point.elapsed,
    }


@bp.get("/api/jobs/<job_id>/losses")
def get_losses(job_id: str) -> Response:
    job = load_job(job_id)
    after = _int_arg("after", 0, 0, 10**9)
    limit = _int_arg("limit", 1000, 1, MAX_LOSS_PAGE)
    points = services.session.scalars(
        select(LossPoint)
        .where(LossPoint.job_id == job.id, LossPoint.iteration > after)
        .order_by(LossPoint.iteration)
        .limit(limit)
    ).all()
    return jsonify({"job": str(job.id), "points": [point_json(p) for p in points]})


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


@bp.get("/api/jobs/<job_id>/events")
def get_events(job_id: str) -> Response:
    """Server-Sent Events: ``status``, ``loss``, ``preview`` and a final ``done``.

    Every event's id is the iteration of the latest loss point sent, so a client that
    reconnects with ``Last-Event-ID: N`` gets the current status and every point after N.

    A stream holds a server thread for as long as it lasts, so a process serves at most
    ``event_streams`` at once and refuses more at once (503 ``streams_busy``): the threads
    left answer the polls, with which the client follows the job meanwhile.
    """
    job_key = load_job(job_id).id
    client, own_places = client_id(), services.client_streams
    if not own_places.acquire(client):
        raise RateLimited(
            f"you hold {own_places.limit} event streams on this server already; close one, "
            "or poll the job instead",
            STREAMS_BUSY_RETRY_SECONDS,
        )
    places = services.event_streams
    if not places.acquire(blocking=False):
        own_places.release(client)
        own = url_for("api.get_job", job_id=str(job_key))
        raise StreamsBusy(
            f"this server's event streams are all taken; poll {own} and {own}/losses "
            "instead, or ask again later",
            STREAMS_BUSY_RETRY_SECONDS,
        )

    def release() -> None:
        places.release()
        own_places.release(client)

    try:
        response = _event_stream(job_key)
    except BaseException:
        release()
        raise
    # The WSGI server closes the response when the stream ends, the client leaves (seen at
    # a write: a keep-alive at least every KEEP_ALIVE_SECONDS) or the request fails.
    response.call_on_close(release)
    return response


def _event_stream(job_key: uuid.UUID) -> Response:
    # The stream reads with short sessions of its own; the request's session would hold a
    # pooled connection (on PostgreSQL, in an open transaction) for the stream's whole life.
    services.session.close()
    raw_last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    try:
        cursor = max(0, int(raw_last))
    except ValueError:
        cursor = 0
    sessions = services.sessions
    preview_url = url_for("api.get_preview", job_id=str(job_key))

    def stream() -> Iterator[str]:
        nonlocal cursor
        status = None
        preview_iteration = None
        last_beat = time.monotonic()
        yield "retry: 1000\n\n"
        while True:
            with sessions() as session:
                current = session.get(Job, job_key)
                if current is None:
                    return
                points = session.scalars(
                    select(LossPoint)
                    .where(LossPoint.job_id == job_key, LossPoint.iteration > cursor)
                    .order_by(LossPoint.iteration)
                    .limit(MAX_LOSS_PAGE)
                ).all()
                if current.status != status:
                    status = current.status
                    yield _sse("status", {"status": status, "attempts": current.attempts}, cursor)
                for point in points:
                    cursor = point.iteration
                    yield _sse("loss", {**point_json(point), "of": current.total}, cursor)
                # Iteration 0: the feed-forward picture, before the first iteration.
                if (
                    current.preview_iteration is not None
                    and current.preview_iteration != preview_iteration
                ):
                    preview_iteration = current.preview_iteration
                    data = {
                        "iteration": preview_iteration,
                        "url": preview_url,
                        "source": current.preview_source or PREVIEW_OPTIMIZER,
                    }
                    yield _sse("preview", data, cursor)
                if current.job_status.finished and len(points) < MAX_LOSS_PAGE:
                    yield _sse("done", {"status": status}, cursor)
                    return
            if time.monotonic() - last_beat > KEEP_ALIVE_SECONDS:
                last_beat = time.monotonic()
                yield ": keep-alive\n\n"
            time.sleep(EVENT_POLL_SECONDS)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(stream()), mimetype="text/event-stream", headers=headers)


@bp.get("/api/jobs/<job_id>/result")
def get_result(job_id: str) -> Response:
    job = load_job(job_id)
    _check_not_expired(job)
    if job.job_status != JobStatus.SUCCEEDED or not job.result_key:
        raise Conflict(f"the job is {job.status}; the result exists once it has succeeded")
    data = services.storage.get(job.result_key)
    headers = {"Content-Disposition": f'inline; filename="stylequeue-{job.id}.png"'}
    return Response(data, mimetype="image/png", headers=headers)


@bp.get("/api/jobs/<job_id>/preview")
def get_preview(job_id: str) -> Response:
    job = load_job(job_id)
    _check_not_expired(job)
    if not job.preview_key or not services.storage.exists(job.preview_key):
        raise NotFound("no preview yet")
    return Response(
        services.storage.get(job.preview_key),
        mimetype="image/png",
        headers={"Cache-Control": "no-store"},
    )


@bp.post("/api/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> tuple[Response, int]:
    """Idempotent: a queued job is canceled at once, a running one within an iteration."""
    job = load_job(job_id)
    if not may_change(job):
        raise Forbidden("only the job's owner may cancel it")
    session = services.session
    if job.job_status.finished:
        return jsonify(job_json(job)), 200
    broker.request_cancel(services.redis, str(job.id))
    job.cancel_requested = True
    if job.job_status == JobStatus.QUEUED:
        job.status, job.finished_at = JobStatus.CANCELED, utcnow()
    session.commit()
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
    limit = _int_arg("limit", 20, 1, 100)
    query = listed(select(Job)).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
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


@bp.get("/api/presets")
def list_presets() -> Response:
    return jsonify(
        {
            "presets": [
                {
                    "name": preset.name,
                    "title": preset.title,
                    "artist": preset.artist,
                    "year": preset.year,
                    "attribution": preset.attribution,
                    "url": url_for("pages.preset_image", name=preset.name),
                }
                for preset in presets().values()
            ]
        }
    )


@bp.get("/api/webhook-secret")
def webhook_secret() -> Response:
    """The secret the caller's callbacks are signed with (shared/webhooks.py)."""
    principal = current_principal()
    if principal.owner is None:
        raise Unauthorized("a signing secret belongs to a token or the web form's session")
    secret = services.settings.webhook_secret
    if not secret:
        raise OptionError("this server does not send callbacks", field="callback_url")
    return jsonify({"secret": owner_secret(secret, principal.owner), "algorithm": "HMAC-SHA256"})


#: Heartbeat fields only admins see: the job a worker runs (another client's id).
PRIVATE_WORKER_FIELDS = frozenset({"job", "jobs"})


@bp.get("/api/workers")
def list_workers() -> Response:
    workers = broker.live_workers(services.redis)
    backbones = sorted({name for w in workers for name in w.get("backbones", [])})
    if not current_principal().admin:
        # The job a worker runs is someone's: its id is for admins only.
        workers = [{k: v for k, v in w.items() if k not in PRIVATE_WORKER_FIELDS} for w in workers]
    return jsonify({"workers": workers, "backbones": backbones})


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    checks: dict[str, Any] = {}
    try:
        services.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        # The error names the database's host, user and paths: for the logs, not for
        # whoever asks.
        log.warning("readyz: database: %s", error)
        checks["database"] = "error"
    try:
        services.redis.ping()
        workers = broker.live_workers(services.redis)
        checks["redis"] = "ok"
    except Exception as error:
        log.warning("readyz: redis: %s", error)
        checks["redis"] = "error"
        workers = []
    checks["workers"] = len(workers)
    # Where jobs can run: each worker's host, device, memory and queues; not the job it
    # runs (another client's id, from which its result could be fetched).
    checks["capacity"] = [
        {key: worker.get(key) for key in ("name", "host", "kind", "device", "device_name",
                                          "memory_bytes", "queues", "backbones")}
        for worker in workers
    ]  # fmt: skip
    ready = checks["database"] == "ok" and checks["redis"] == "ok" and checks["workers"] > 0
    return jsonify({"status": "ready" if ready else "not ready", **checks}), 200 if ready else 503


@bp.get("/api/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
