"""Per-client request counts in fixed one-minute windows, shared by the web's processes
through Redis, with most of the round trips saved.

A Redis round trip at every API request was about 30 % of a status poll's CPU under
gunicorn (bench/api.py: a poll cost 3.04-3.07 ``/healthz`` requests with it, 2.13-2.14
without). Here each process counts its own requests and adds them to the shared count in
Redis in batches: after b requests of a client, or at once when the client is past half
its limit. A process knows its own requests exactly and the others' as of its last batch,
so a limit is exact with one process; with P processes a client can get at most
P × (b - 1) requests past it in a window. b is ``batch`` (8) for limits of 320 a minute
and more, less below, and 1 (every request sent) under 80: so the API's default limit
(600) lets at most 7 requests a process past it, and the submit limit (30) none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from shared import broker

log = logging.getLogger(__name__)

#: Adds ``amount`` to the count at ``key`` (which expires ``ttl_seconds`` after its window's
#: first request) and returns the shared count.
AddToWindow = Callable[[str, int, int], int]


@dataclass
class _Count:
    #: The shared count as Redis gave it at this process's last batch.
    shared: int = 0
    #: This process's requests since, not yet added to Redis.
    pending: int = 0


class WindowCounts:
    """A process's view of the per-client counts of the current window."""

    #: A client's batch is at most its limit divided by this.
    LIMIT_PER_BATCH = 40

    def __init__(self, add_to_window: AddToWindow, *, batch: int = 8) -> None:
        self._add = add_to_window
        self._batch = batch
        self._lock = threading.Lock()
        self._window = -1
        self._counts: dict[str, _Count] = {}

    def hit(self, key: str, *, window: int, limit: int, ttl_seconds: int) -> int:
        """Count one request for ``key`` in ``window``; returns the count as far as this
        process knows it. Redis's errors propagate, and the request stays counted here."""
        batch = max(1, min(self._batch, limit // self.LIMIT_PER_BATCH))
        with self._lock:
            if window > self._window:  # a new minute: the last one's counts are done with
                self._window, self._counts = window, {}
            count = self._counts.setdefault(key, _Count())
            count.pending += 1
            known = count.shared + count.pending
            if count.pending < batch and 2 * known < limit:
                return known
            sending, count.pending = count.pending, 0
        try:
            shared = self._add(key, sending, ttl_seconds)
        except Exception:
            with self._lock:
                count.pending += sending
            raise
        with self._lock:
            # Two threads may send for the same client at once: the later count holds both.
            count.shared = max(count.shared, shared)
            return count.shared + count.pending


class RedisWindows:
    """:data:`AddToWindow` on a Redis server: INCRBY, and EXPIRE when the window's count
    starts, as one Lua script (one round trip); where the server refuses scripts (an ACL,
    a managed Redis without scripting), the two commands pipelined."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(broker.RATE_WINDOW_SCRIPT)
        #: Set once the server refused the script.
        self.script_refused = threading.Event()

    def __call__(self, key: str, amount: int, ttl_seconds: int) -> int:
        if not self.script_refused.is_set():
            try:
                return int(self._script(keys=[key], args=[ttl_seconds, amount]))
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except redis.RedisError as error:
                self.script_refused.set()
                log.warning(
                    "Redis refused the rate-limit script (%s); using INCRBY and EXPIRE", error
                )
        pipe = self._client.pipeline(transaction=False)
        pipe.incrby(key, amount)
        pipe.expire(key, ttl_seconds)
        return int(pipe.execute()[0])
