"""A job's progress as Server-Sent Events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from flask import (
    Response,
    g,
    request,
    stream_with_context,
    url_for,
)
from sqlalchemy import bindparam, select

from shared.errors import RateLimited, StreamsBusy
from shared.models import (
    PREVIEW_OPTIMIZER,
    Job,
    JobStatus,
    LossPoint,
)
from shared.options import MAX_ITERATIONS
from web.api import bp
from web.api.access import client_id
from web.api.reads import (
    MAX_LOSS_PAGE,
    load_job_row,
)
from web.api.serialize import point_json
from web.extensions import services

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
    reconnects with ``Last-Event-ID: N`` gets the current status and every point after N:
    read from the database once, then from the job's live feed (web/feeds.py), which
    costs the database nothing per watcher.

    A process serves at most ``event_streams`` at once and refuses more at once (503
    ``streams_busy``; the client polls meanwhile): under gunicorn's gevent workers a
    stream is a greenlet and the limit is in the thousands; on a threaded server each
    holds a thread, and the limit stays below them so that polls keep theirs.
    """
    job_key = load_job_row(job_id).id
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


# A stream's reads of the database, in Core on the reader's pooled connections: a thousand
# streams connecting at once (a web process restarted) load no ORM objects, and the job's
# styles and runs, which a stream never sends, are not read.
_jobs, _points = Job.__table__.c, LossPoint.__table__.c
_REPLAY_JOB = select(
    _jobs.status, _jobs.attempts, _jobs.total, _jobs.preview_iteration, _jobs.preview_source
).where(_jobs.id == bindparam("job_id"))
_REPLAY_POINTS = (
    select(_points.iteration, _points.total, _points.content, _points.style, _points.tv,
           _points.temporal, _points.elapsed)
    .where(_points.job_id == bindparam("job_id"), _points.iteration > bindparam("after"))
    .order_by(_points.iteration)
    .limit(MAX_LOSS_PAGE)
)  # fmt: skip


class _Replay:
    """What one stream has sent: the last loss point's iteration (its events' id), the
    status, the preview and the job's total; read from the database by :meth:`read`."""

    def __init__(self, job_key: uuid.UUID, cursor: int, preview_url: str) -> None:
        self.job_key, self.cursor, self.preview_url = job_key, cursor, preview_url
        self.status: str | None = None
        self.preview_iteration: int | None = None
        self.total = 0
        self.finished = False
        self.gone = False

    def read(self) -> Iterator[str]:
        """Everything the database has that this stream has not sent: the status, the loss
        points after the cursor (every page of them), the preview; the job's end. Each page
        is read, and its connection given back, before anything is sent: a slow client
        holds no pooled connection."""
        while True:
            with services.reader.connect() as connection:
                current = connection.execute(_REPLAY_JOB, {"job_id": self.job_key}).first()
                if current is None:
                    self.gone = True
                    return
                after = {"job_id": self.job_key, "after": self.cursor}
                points = [point_json(row) for row in connection.execute(_REPLAY_POINTS, after)]
            status, attempts, self.total = current.status, current.attempts, current.total
            preview = (current.preview_iteration, current.preview_source)
            finished = JobStatus(status).finished
            if status != self.status:
                self.status = status
                yield _sse("status", {"status": status, "attempts": attempts}, self.cursor)
            yield from self.points(points)
            # Iteration 0: the feed-forward picture, before the first iteration.
            yield from self.preview(*preview)
            if len(points) < MAX_LOSS_PAGE:
                self.finished = finished
                return

    def points(
        self, points: list[dict[str, Any]], rendered: dict[int, str] | None = None
    ) -> Iterator[str]:
        """The loss events of ``points`` after the cursor; ``rendered``: the texts made for
        the same feed entry's other watchers (one ``json.dumps`` per point, not per
        watcher)."""
        for point in points:
            iteration = point["iteration"]
            if iteration > self.cursor:
                self.cursor = iteration
                text = rendered.get(iteration) if rendered is not None else None
                if text is None:
                    text = _sse("loss", {**point, "of": self.total}, iteration)
                    if rendered is not None:
                        rendered[iteration] = text
                yield text

    def preview(self, iteration: int | None, source: str | None) -> Iterator[str]:
        if iteration is not None and iteration != self.preview_iteration:
            self.preview_iteration = iteration
            data = {"iteration": iteration, "url": self.preview_url,
                    "source": source or PREVIEW_OPTIMIZER}  # fmt: skip
            yield _sse("preview", data, self.cursor)

    def live(self, entry: dict[str, Any]) -> Iterator[str]:
        """One feed entry: its points and preview as they are; a new status, a gap in the
        points or a row ahead of them (the reader's check) are read from the database."""
        points = entry.get("points") or []
        fresh = [point for point in points if point["iteration"] > self.cursor]
        check = entry.get("check")
        if (
            (fresh and fresh[0]["iteration"] > self.cursor + 1)  # a lost publish
            or ("status" in entry and entry["status"] != self.status)
            or (check and (check["status"] != self.status or check["iteration"] > self.cursor))
        ):
            yield from self.read()
            return
        yield from self.points(fresh, entry.setdefault("rendered", {}))
        if "preview" in entry:
            yield from self.preview(entry["preview"]["iteration"], entry["preview"]["source"])


def _event_stream(job_key: uuid.UUID) -> Response:
    # The stream reads on short connections of its own; a session the request opened (a
    # token's check) would hold a pooled connection (on PostgreSQL, in an open
    # transaction) for the stream's whole life.
    if "db_session" in g:
        services.session.close()
    raw_last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    try:
        # No job has more than MAX_ITERATIONS points: a larger id (up to any length of
        # digits, which SQLite's 64-bit integers would overflow on) means "after the last".
        cursor = min(max(0, int(raw_last[:32])), MAX_ITERATIONS)
    except ValueError:
        cursor = 0
    state = _Replay(job_key, cursor, url_for("api.get_preview", job_id=str(job_key)))
    feeds = services.feeds

    def stream() -> Iterator[str]:
        # Subscribed first, then the database read once: an entry published meanwhile is
        # in both (sent once, by its iteration), and none is in neither (shared/feed.py).
        subscriber = feeds.subscribe(str(job_key))
        try:
            yield "retry: 1000\n\n"
            yield from state.read()
            while not (state.finished or state.gone):
                entries = subscriber.take(KEEP_ALIVE_SECONDS)
                if subscriber.lagging:
                    return  # too slow: it reconnects with Last-Event-ID, from the database
                if not entries:
                    yield ": keep-alive\n\n"
                # One write for what one wake-up brings, not one per event.
                texts = "".join(text for entry in entries for text in state.live(entry))
                if texts:
                    yield texts
            if state.finished:
                yield _sse("done", {"status": state.status}, state.cursor)
        finally:
            feeds.unsubscribe(subscriber)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return Response(stream_with_context(stream()), mimetype="text/event-stream", headers=headers)
