"""web/ratelimit.py: per-client counts shared through a real Redis, sent in batches."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import redis

from shared import broker
from tests.service import RedisServer
from web.ratelimit import RedisWindows, WindowCounts


class Sent:
    """The real Redis adder, with its calls counted."""

    def __init__(self, url: str) -> None:
        self.adder = RedisWindows(broker.connect(url))
        self.calls = 0

    def __call__(self, key: str, amount: int, ttl_seconds: int) -> int:
        self.calls += 1
        return self.adder(key, amount, ttl_seconds)


def new_key() -> str:
    return f"test:rate:{uuid.uuid4().hex}"


def test_one_process_counts_exactly_and_sends_a_batch_at_a_time_below_half_the_limit(
    redis_url: str,
) -> None:
    sent = Sent(redis_url)
    counts = WindowCounts(sent, batch=8)
    key = new_key()
    seen = [counts.hit(key, window=1, limit=400, ttl_seconds=60) for _ in range(250)]
    assert seen == list(range(1, 251))
    # Below half the limit one round trip per 8 requests (at 8, 16, ..., 200), then one
    # for each request from the 201st: 25 + 50.
    assert sent.calls == 75
    assert int(broker.connect(redis_url).get(key) or 0) == 250
    assert 0 < broker.connect(redis_url).ttl(key) <= 60


def test_a_small_limit_is_exact_in_one_process(redis_url: str) -> None:
    counts = WindowCounts(Sent(redis_url), batch=8)
    key = new_key()
    admitted = [counts.hit(key, window=1, limit=3, ttl_seconds=60) <= 3 for _ in range(5)]
    assert admitted == [True, True, True, False, False]


def admitted_across(processes: list[WindowCounts], limit: int, requests: int) -> int:
    """Requests sent to the processes in turn; how many were let through."""
    key = new_key()
    return sum(
        processes[request % len(processes)].hit(key, window=1, limit=limit, ttl_seconds=60) <= limit
        for request in range(requests)
    )


def test_processes_share_the_count_and_overshoot_by_less_than_a_batch_each(
    redis_url: str,
) -> None:
    limit, batch = 400, 8
    processes = [WindowCounts(Sent(redis_url), batch=batch) for _ in range(3)]
    admitted = admitted_across(processes, limit, 3 * limit)
    # Without the sharing each process would admit 400 of its own 400.
    assert limit <= admitted <= limit + len(processes) * (batch - 1)


def test_a_limit_under_80_is_sent_at_every_request_and_exact_across_processes(
    redis_url: str,
) -> None:
    sent = [Sent(redis_url) for _ in range(3)]
    processes = [WindowCounts(one, batch=8) for one in sent]
    assert admitted_across(processes, 30, 90) == 30
    assert sum(one.calls for one in sent) == 90


def test_a_new_window_starts_from_zero(redis_url: str) -> None:
    counts = WindowCounts(Sent(redis_url), batch=8)
    key = new_key()
    for _ in range(5):
        counts.hit(f"{key}:1", window=1, limit=3, ttl_seconds=60)
    assert counts.hit(f"{key}:2", window=2, limit=3, ttl_seconds=60) == 1


def test_threads_lose_no_request(redis_url: str) -> None:
    counts = WindowCounts(Sent(redis_url), batch=8)
    key = new_key()

    def requests() -> None:
        for _ in range(250):
            counts.hit(key, window=1, limit=10**9, ttl_seconds=60)

    threads = [threading.Thread(target=requests) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One process knows its own requests exactly: the 1,000 and this one.
    assert counts.hit(key, window=1, limit=10**9, ttl_seconds=60) == 1001


def test_a_request_redis_did_not_take_stays_counted(redis_url: str, tmp_path: Path) -> None:
    down = RedisServer(tmp_path)  # never started: its port refuses connections
    adders = [RedisWindows(broker.connect(down.url))]

    def add(key: str, amount: int, ttl_seconds: int) -> int:
        return adders[-1](key, amount, ttl_seconds)

    counts = WindowCounts(add, batch=1)
    key = new_key()
    with pytest.raises(redis.ConnectionError):
        counts.hit(key, window=1, limit=100, ttl_seconds=60)
    adders.append(RedisWindows(broker.connect(redis_url)))
    assert counts.hit(key, window=1, limit=100, ttl_seconds=60) == 2
    assert int(broker.connect(redis_url).get(key) or 0) == 2
