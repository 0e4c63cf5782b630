"""A job's progress as Server-Sent Events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import (
    Response,
    request,
    stream_with_context,
    url_for,
)
from sqlalchemy import select

from shared.errors import RateLimited, StreamsBusy
from shared.models import (
    PREVIEW_OPTIMIZER,
    Job,
    LossPoint,
)
from web.api import bp
from web.api.access import client_id
from web.api.reads import (
    MAX_LOSS_PAGE,
    load_job,
)
from web.api.serialize import point_json
from web.extensions import services

#: How often the event stream looks for news in the database.
EVENT_POLL_SECONDS = 0.25


#: An idle event stream sends a comment this often: proxies keep it open, and a client
#: that has left is noticed (the write fails), which frees its thread.
KEEP_ALIVE_SECONDS = 5


#: When a client refused an event stream (every place taken) may ask again.
STREAMS_BUSY_RETRY_SECONDS = 10


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
