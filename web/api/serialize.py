"""The job, its links and its loss points as the API shows them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import redis
from flask import (
    url_for,
)
from sqlalchemy import Row

from shared import broker
from shared.estimate import RATE_FIELD, estimate, remaining_fraction
from shared.jobs import scale_plan
from shared.models import (
    PREVIEW_OPTIMIZER,
    Job,
    JobKind,
    JobMode,
    JobRun,
    JobStatus,
    JobStyle,
    LossPoint,
)
from shared.parts import FrameRun, parts_json, parts_of
from shared.queue import queue_ahead
from web.api.reads import (
    worker_speeds,
)
from web.extensions import services


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


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
        expected = estimate(worker_speeds(), work=job.work or 0, work_ahead=ahead[1], fast=fast)
        eta, wait = expected["total_seconds"], expected["wait_seconds"]
    body: dict[str, Any] = {
        "id": str(job.id),
        "status": status.value,
        "mode": job.mode,
        "kind": job.kind,
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
    if job.parent_id is not None:
        body["parent"] = {"id": str(job.parent_id), "index": job.part_index}
    if job.frames is not None:
        run = FrameRun.of_job(job.frames)
        body["frames"] = {"first": run.first, "start": run.start, "stop": run.stop}
    if JobKind(job.kind).has_parts:
        _with_parts(job, body)
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


def _with_parts(job: Job | Row[Any], body: dict[str, Any]) -> None:
    """A batch's or video's parts, its progress (theirs together), its source video."""
    parts = parts_of(services.session, job)
    body["parts"] = parts_json(parts)
    for item in body["parts"]["items"]:
        item["url"] = url_for("api.get_job", job_id=item["id"])
    body["progress"] = {
        "iteration": sum(part.iteration for part in parts),
        "total": sum(part.total for part in parts),
    }
    body["scales"] = []
    if job.media is not None:
        body["video"] = job.media
    if JobStatus(job.status) == JobStatus.RUNNING:  # its parts' ETAs are their own
        body["eta_seconds"] = None
        body["wait_seconds"] = 0.0


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


def point_json(point: LossPoint | Row[Any]) -> dict[str, Any]:
    return {
        "iteration": point.iteration,
        "total": point.total,
        "content": point.content,
        "style": point.style,
        "tv": point.tv,
        "temporal": point.temporal,
        "elapsed": point.elapsed,
    }
