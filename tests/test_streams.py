"""Hundreds of event streams on the production server (gunicorn's gevent workers, its
gunicorn.conf.py) watching a job that a real worker runs: every stream receives every loss
point once and in order, and the done event, also those that leave midway and come back
with ``Last-Event-ID``. The points reach the web through the job's live feed in Redis
(shared/feed.py, web/feeds.py): the web's own check of the rows is set off here, and a
stream reads the database only when it connects and when the status changes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from shared.config import Settings
from shared.feed import feed_key
from stylequeue.service import free_port
from tests.service import (
    RedisServer,
    WorkerProcess,
    serves,
    service_settings,
    start_gunicorn,
    wait_for,
)

STREAMS = 300
ITERATIONS = 240


@dataclass
class Follower:
    """One client: the loss iterations it received, in order, and how it ended."""

    leave_after: int | None  #: leaves after this many points, then comes back
    iterations: list[int] = field(default_factory=list)
    done: str | None = None
    reconnected: bool = False


async def read_events(port: int, path: str, last_id: int | None, follower: Follower,
                      leave_after: int | None) -> int | None:  # fmt: skip
    """Follow ``path`` (HTTP/1.0: no chunked encoding) and note its events; the last event
    id seen when it left (after ``leave_after`` points), or None at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
    if last_id is not None:
        head += f"Last-Event-ID: {last_id}\r\n"
    event, data, event_id, seen = None, None, last_id, 0
    try:
        writer.write((head + "\r\n").encode())
        status = await reader.readline()
        assert b" 200 " in status, status
        while (await reader.readline()).strip():  # the headers
            pass
        while True:
            raw = await asyncio.wait_for(reader.readline(), 60)
            if not raw:  # the server ended the stream
                break
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line == "" and event is not None:
                if event == "loss":
                    follower.iterations.append(data["iteration"])
                    seen += 1
                    if leave_after is not None and seen >= leave_after:
                        return event_id
                elif event == "done":
                    follower.done = data["status"]
                    return None
                event, data = None, None
    finally:
        writer.close()
    return None


async def follow(port: int, path: str, follower: Follower) -> None:
    left_at = await read_events(port, path, None, follower, follower.leave_after)
    if left_at is not None:
        follower.reconnected = True
        await read_events(port, path, left_at, follower, None)


async def follow_all(port: int, path: str, followers: list[Follower]) -> None:
    await asyncio.wait_for(asyncio.gather(*(follow(port, path, f) for f in followers)), timeout=240)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int, Settings]]:
    """Redis, a worker, and gunicorn with one gevent worker process, as in production."""
    redis_server = RedisServer(tmp_path)
    redis_server.start()
    settings = service_settings(
        tmp_path,
        redis_server.url,
        event_streams_per_client=2 * STREAMS,
        fast_previews=False,
        # The rows' check out of the way: every point must come through the job's feed.
        stream_check_seconds=3600,
    )
    worker = WorkerProcess(settings, "streams", tmp_path / "worker.log")
    port = free_port()
    web = start_gunicorn(
        settings, tmp_path / "gunicorn.log", f"--bind 127.0.0.1:{port} --workers 1",
        unset=("STYLEQUEUE_EVENT_STREAMS",),  # gunicorn.conf.py's, for gevent
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        worker.start()
        wait_for(lambda: serves(base), 60, "gunicorn")
        yield base, port, settings
    except BaseException:
        print((tmp_path / "gunicorn.log").read_text()[-4000:])
        raise
    finally:
        web.terminate()
        web.wait(30)
        worker.stop()
        redis_server.stop()


def test_hundreds_of_streams_each_get_every_point_once_across_reconnects(
    server: tuple[str, int, Settings], sample_images: Path
) -> None:
    base, port, settings = server
    photo = (sample_images / "content" / "photo.jpg").read_bytes()
    data = {"style_preset": "starry-night", "backbone": "vgg19-random", "size": "64",
            "scales": "1", "iterations": str(ITERATIONS)}  # fmt: skip
    response = requests.post(base + "/api/jobs", data=data,
                             files={"content": ("photo.jpg", photo)}, timeout=30)  # fmt: skip
    assert response.status_code == 202, response.text
    job = response.json()
    # Half follow to the end; the others leave after 1 to 60 points and come back.
    followers = [Follower(leave_after=None if i % 2 else 1 + i % 60) for i in range(STREAMS)]
    asyncio.run(follow_all(port, job["links"]["events"], followers))

    final = requests.get(base + job["links"]["self"], timeout=10).json()
    assert final["status"] == "succeeded", final
    for follower in followers:
        assert follower.done == "succeeded"
        assert follower.iterations == list(range(1, ITERATIONS + 1)), (
            follower.leave_after,
            follower.iterations[:5],
            len(follower.iterations),
        )
    assert sum(f.reconnected for f in followers) >= STREAMS // 3  # left and came back
    # The points went through the job's feed: the worker published its flushes there.
    client = redis.Redis.from_url(settings.redis_url)
    try:
        entries = client.xrange(feed_key(job["id"]))
    finally:
        client.close()
    published = [p["iteration"] for _, e in entries if b"points" in e
                 for p in json.loads(e[b"points"])]  # fmt: skip
    assert published == list(range(1, ITERATIONS + 1))


def test_a_feed_reaches_every_subscriber_and_the_check_finds_a_lost_publish(
    tmp_path: Path, redis_url: str, sample_images: Path
) -> None:
    """The hub of one web process: a published entry reaches each subscriber of its job
    once; points written to the database without a publish (Redis lost it) are announced
    by the rows' check, and only once they were ahead at two checks in a row; so is a
    status whose publish was lost."""
    from sqlalchemy import update

    from shared import feed
    from shared.db import insert_ignoring_duplicates
    from shared.models import Job, LossPoint
    from tests.service import service_app, submit_preset

    settings = service_settings(tmp_path, redis_url, stream_check_seconds=0.2)
    with service_app(settings) as app, app.app_context():
        from web.extensions import services

        job = submit_preset(app.test_client(), sample_images / "content" / "photo.jpg", 50)
        hub = services.feeds
        first, second = hub.subscribe(job["id"]), hub.subscribe(job["id"])
        assert hub.watched() == 1  # one subscription for the job, however many watch it
        client = redis.Redis.from_url(redis_url)
        try:
            point = {"iteration": 1, "total": 2.0, "content": 1.0, "style": 1.0, "tv": 0.0,
                     "elapsed": 0.1}  # fmt: skip
            assert feed.publish(client, job["id"], points=[point])
            for subscriber in (first, second):
                entries = wait_for(lambda s=subscriber: s.take(0.5), 10, "the entry")
                assert [e.get("points") for e in entries if "points" in e] == [[point]]
            # Point 2 reaches the database only: the check announces it.
            with services.sessions.begin() as session:
                values = {**point, "iteration": 2, "job_id": uuid.UUID(job["id"])}
                session.execute(insert_ignoring_duplicates(session, LossPoint), [values])
                session.execute(update(Job).where(Job.id == uuid.UUID(job["id"]))
                                .values(iteration=2))  # fmt: skip

            def announced() -> dict[str, int] | None:
                checks = [e["check"] for e in first.take(0.3) if "check" in e]
                return checks[-1] if checks and checks[-1]["iteration"] == 2 else None

            assert wait_for(announced, 10, "the check's news")["status"] == "queued"
            # A status the feed never heard of (its publish lost): announced too.
            with services.sessions.begin() as session:
                session.execute(update(Job).where(Job.id == uuid.UUID(job["id"]))
                                .values(status="canceled"))  # fmt: skip

            def canceled() -> bool:
                return any(e.get("check", {}).get("status") == "canceled"
                           for e in second.take(0.3))  # fmt: skip

            wait_for(canceled, 10, "the lost status")
        finally:
            client.close()
            hub.unsubscribe(first)
            hub.unsubscribe(second)
        assert hub.watched() == 0


def test_a_feed_keeps_each_entry_once_for_all_its_subscribers() -> None:
    """A watched job's entries are kept once, in a ring every subscriber reads at its own
    place: each takes every entry after it subscribed, once and in order; a delivery wakes
    a waiting take at once; one that fell a ring's length behind is told it lags."""
    from web.feeds import SUBSCRIBER_BACKLOG, Subscriber, _Feed

    feed = _Feed("job", "0-0")
    early = Subscriber(feed)
    feed.deliver({"n": 1})
    late = Subscriber(feed)
    for n in (2, 3):
        feed.deliver({"n": n})
    assert [e["n"] for e in early.take(0)] == [1, 2, 3]
    assert [e["n"] for e in late.take(0)] == [2, 3]
    assert early.take(0) == [] and late.take(0) == []
    assert len(feed.entries) == 3  # one copy, not one per subscriber

    timer = threading.Timer(0.1, feed.deliver, [{"n": 4}])
    started = time.monotonic()
    timer.start()
    assert [e["n"] for e in early.take(10)] == [4]
    assert time.monotonic() - started < 5
    timer.join()
    assert [e["n"] for e in late.take(0)] == [4]

    for n in range(5, 5 + SUBSCRIBER_BACKLOG):  # a whole ring's length: still all there
        feed.deliver({"n": n})
    assert [e["n"] for e in late.take(0)] == list(range(5, 5 + SUBSCRIBER_BACKLOG))
    assert not late.lagging
    feed.deliver({"n": 0})
    assert early.take(0) == [] and early.lagging  # one more behind: its stream ends


def test_the_reader_reads_redis_at_most_once_a_gap_however_busy_the_feeds(
    redis_url: str,
) -> None:
    """Twenty watched jobs writing every 5 ms (4,000 entries a second): the process's one
    reader asks Redis at most once every READ_GAP_SECONDS, each read taking what gathered,
    and every subscriber still gets every entry of its job once and in order."""
    from shared import feed
    from web.feeds import READ_GAP_SECONDS, FeedHub, Subscriber

    class Counted(redis.Redis):  # a real client that counts its XREADs
        reads = 0

        def xread(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            Counted.reads += 1
            return super().xread(*args, **kwargs)  # type: ignore[arg-type]

    hub = FeedHub(Counted.from_url(redis_url), lambda ids: {}, check_seconds=60)
    jobs = [str(uuid.uuid4()) for _ in range(20)]
    subscribers = [hub.subscribe(job) for job in jobs]
    writer = redis.Redis.from_url(redis_url)
    try:
        time.sleep(0.3)  # the reader is waiting on the feeds
        before, began = Counted.reads, time.monotonic()
        for n in range(1, 201):
            for job in jobs:
                feed.publish(writer, job, status=str(n))
            time.sleep(max(0.0, began + n * 0.005 - time.monotonic()))
        reads, seconds = Counted.reads - before, time.monotonic() - began

        def received(subscriber: Subscriber, got: list[str]) -> bool:
            got += [entry["status"] for entry in subscriber.take(0.1)]
            return len(got) >= 200

        for subscriber in subscribers:
            got: list[str] = []
            wait_for(lambda s=subscriber, g=got: received(s, g), 10, "every entry")
            assert got == [str(n) for n in range(1, 201)]
        assert reads <= seconds / READ_GAP_SECONDS + 2, (reads, seconds)
    finally:
        for subscriber in subscribers:
            hub.unsubscribe(subscriber)
        hub.close()
        writer.delete(*(feed_key(job) for job in jobs))
        writer.close()
