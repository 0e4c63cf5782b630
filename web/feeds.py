"""The live feeds of the jobs this web process's clients watch (shared/feed.py is the
worker's side).

One reader per process follows every watched job's feed with one blocking ``XREAD`` over
all of them, and keeps each entry once for all the subscribers of its job, who take it
from there: a job watched by a thousand clients costs one subscription and one copy of
each entry, and no client asks the database while it waits.
Every ``STYLEQUEUE_STREAM_CHECK_SECONDS`` the reader reads the status and iteration of all
the watched jobs in one query; when the database was ahead of what the feed said at two
checks in a row (a publish lost while Redis was away, a status the reconciler wrote), the
job's subscribers are told to read the difference from the database. So the queries per
second depend on neither the number of watchers nor the number of jobs.

It runs on threads; under gunicorn's gevent workers (gunicorn.conf.py) those are
greenlets, and an idle stream costs a few kilobytes, not a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis

from shared.feed import decode, feed_key

log = logging.getLogger(__name__)

#: How long one ``XREAD`` waits for news before the reader looks at its jobs again (new
#: subscriptions are read from the next call on, missing nothing: each starts at the id
#: its feed had when it was subscribed).
READ_BLOCK_MS = 100
#: The least time between two ``XREAD``s. An ``XREAD`` returns at the first entry of any
#: watched job, and names every watched job's feed: without a gap, each entry would cost a
#: read of them all (with 50 jobs flushing twice a second, 100 reads a second, 15 % of a
#: web process's CPU with 5,000 streams open: bench/streams.py, py-spy). With it, a process
#: reads at most 1 / READ_GAP_SECONDS times a second, however many jobs it watches and
#: however often they write, and an entry waits at most this long more.
READ_GAP_SECONDS = 0.025
#: Entries a subscriber may leave unread. A client that reads slower than its job writes
#: is let go at this many (its stream ends; it reconnects with ``Last-Event-ID`` and
#: replays from the database), rather than buffered without bound.
SUBSCRIBER_BACKLOG = 256

#: ``check(job_ids) -> {job_id: (status, iteration)}``: the watched jobs' rows.
JobCheck = Callable[[list[str]], dict[str, tuple[str, int]]]


class _Feed:
    """One watched job: the entries read from its feed, kept once for all its subscribers
    (the last ``SUBSCRIBER_BACKLOG``, numbered), and what the reader knows of the job. An
    entry costs one append and one wake-up however many watch, not a copy per watcher."""

    def __init__(self, job_id: str, last_id: str | bytes | None) -> None:
        self.job_id = job_id
        #: The id of the last entry read; None until the feed's tail is known.
        self.last_id = last_id
        self.subscribers: set[Subscriber] = set()
        #: What the feed (or the checks) said: the status and the latest iteration.
        self.status: str | None = None
        self.iteration = 0
        #: The job's row at the previous check: (status, iteration).
        self.checked: tuple[str, int] | None = None
        #: The entries delivered so far, counted; the latest of them with their numbers.
        self.delivered = 0
        self.entries: deque[tuple[int, dict[str, Any]]] = deque(maxlen=SUBSCRIBER_BACKLOG)
        #: Set (and replaced) at each delivery: what the subscribers wait on.
        self.news = threading.Event()
        self._lock = threading.Lock()

    def note(self, entry: dict[str, Any]) -> None:
        if entry.get("points"):
            self.iteration = max(self.iteration, entry["points"][-1]["iteration"])
        if "status" in entry:
            self.status = entry["status"]

    def deliver(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.delivered += 1
            self.entries.append((self.delivered, entry))
            news, self.news = self.news, threading.Event()
        news.set()

    def since(self, seen: int) -> tuple[list[dict[str, Any]], int, bool]:
        """The entries after number ``seen``; the number of the last; whether some after
        ``seen`` were dropped before they were read (a reader ``SUBSCRIBER_BACKLOG``
        behind)."""
        with self._lock:
            missed = self.delivered - seen > len(self.entries)
            fresh = [entry for number, entry in self.entries if number > seen]
            return fresh, self.delivered, missed


class Subscriber:
    """One stream's place in its job's feed: the entries it has taken."""

    def __init__(self, feed: _Feed) -> None:
        self.job_id = feed.job_id
        self._feed = feed
        #: Set when it fell ``SUBSCRIBER_BACKLOG`` entries behind: its stream should end.
        self.lagging = False
        self._seen = feed.delivered

    def take(self, timeout: float) -> list[dict[str, Any]]:
        """The entries delivered since the last take, waiting up to ``timeout`` seconds
        for one."""
        feed = self._feed
        news = feed.news  # before the count: a delivery in between sets this one
        if feed.delivered == self._seen:
            news.wait(timeout)
        entries, self._seen, self.lagging = feed.since(self._seen)
        return [] if self.lagging else entries


class FeedHub:
    """This process's subscriptions to job feeds, and the one thread that reads them."""

    def __init__(self, redis_client: redis.Redis, check: JobCheck, check_seconds: float) -> None:
        self.redis = redis_client
        self.check = check
        self.check_seconds = check_seconds
        self._feeds: dict[str, _Feed] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, job_id: str) -> Subscriber:
        """A subscription to the job's feed, from now on: the caller replays what came
        before from the database *after* this (the worker publishes after it commits, so
        nothing falls between the two)."""
        key = feed_key(job_id)
        with self._lock:
            known = key in self._feeds
        tail = None if known else self._tail(key)  # a Redis round trip: not under the lock
        with self._lock:
            # One hold: a feed whose last subscriber left meanwhile is made anew, never
            # joined after its removal (the reader would not read it).
            feed = self._feeds.get(key)
            if feed is None:
                feed = self._feeds[key] = _Feed(job_id, tail)
            subscriber = Subscriber(feed)
            feed.subscribers.add(subscriber)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="feeds", daemon=True)
                self._thread.start()
        self._wake.set()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        key = feed_key(subscriber.job_id)
        with self._lock:
            feed = self._feeds.get(key)
            if feed is not None:
                feed.subscribers.discard(subscriber)
                if not feed.subscribers:
                    del self._feeds[key]

    def close(self) -> None:
        """Stop reading (the app's end) and close the Redis connections."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.redis.close()
        self.redis.connection_pool.disconnect()

    def watched(self) -> int:
        """The jobs this process follows now."""
        with self._lock:
            return len(self._feeds)

    def _tail(self, key: str) -> str | None:
        """The id of the feed's last entry ("0-0" for none yet); None if Redis is away."""
        try:
            last = self.redis.xrevrange(key, count=1)
        except redis.RedisError:
            return None
        return last[0][0] if last else "0-0"

    def _run(self) -> None:
        checked = time.monotonic()
        while not self._stopped.is_set():
            with self._lock:
                feeds = list(self._feeds.items())
            if not feeds:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            for key, feed in feeds:
                if feed.last_id is None:
                    feed.last_id = self._tail(key)
                    if feed.last_id is None:
                        break  # Redis is away: the rest wait, the database check does not
            streams = {key: feed.last_id for key, feed in feeds if feed.last_id is not None}
            try:
                if streams:
                    began = time.monotonic()
                    answer = self.redis.xread(streams, block=READ_BLOCK_MS)  # type: ignore[arg-type]
                    self._dispatch(answer)
                    if answer:  # news came at once: let more gather before the next read
                        self._stopped.wait(max(0.0, READ_GAP_SECONDS - (time.monotonic() - began)))
                else:
                    time.sleep(READ_BLOCK_MS / 1000)
            except redis.RedisError as error:
                log.warning("feeds: Redis: %s; the database check carries on", error)
                time.sleep(0.5)
            except Exception:
                log.exception("feeds: reading failed")
                time.sleep(0.5)
            if time.monotonic() - checked >= self.check_seconds:
                checked = time.monotonic()
                self._check_rows(feed for _, feed in feeds)

    def _dispatch(self, answer: Any) -> None:
        for key, entries in answer or []:
            name = key.decode() if isinstance(key, bytes) else key
            with self._lock:
                feed = self._feeds.get(name)
            if feed is None:
                continue
            for entry_id, fields in entries:
                feed.last_id = entry_id
                entry = decode(fields)
                feed.note(entry)
                feed.deliver(entry)

    def _check_rows(self, feeds: Iterable[_Feed]) -> None:
        """One query for every watched job: where the row is ahead of the feed, its
        subscribers are told to read the database."""
        feeds = list(feeds)
        try:
            rows = self.check([feed.job_id for feed in feeds])
        except Exception as error:
            log.warning("feeds: the database check failed: %s", error)
            return
        for feed in feeds:
            row = rows.get(feed.job_id)
            if row is None:
                continue
            previous, feed.checked = feed.checked, row
            if previous is None:
                # The first look. Its subscribers read the row when they connected, but a
                # status may have changed since and its publish been lost: each compares
                # the status with its own (its points are judged at the next check).
                feed.status = feed.status or row[0]
                entry = {"check": {"status": row[0], "iteration": 0}}
            else:
                # The worker publishes right after it commits, so a row may be ahead of the
                # feed for a moment; ahead at two checks in a row, the feed missed something.
                missed_status = row[0] != feed.status and row[0] == previous[0]
                missed_points = previous[1] > feed.iteration
                if not (missed_status or missed_points):
                    continue
                feed.status, feed.iteration = row[0], max(previous[1], feed.iteration)
                entry = {"check": {"status": row[0], "iteration": row[1]}}
            feed.deliver(entry)
