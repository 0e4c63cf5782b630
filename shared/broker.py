"""What the web and the workers exchange through Redis besides Celery messages.

- Cancel flags: ``stylequeue:cancel:<job id>``, set by the API, read by a running job's
  reporter every 0.1 s (one EXISTS, far cheaper than a database query).
- Rate-limit windows: ``stylequeue:rate:<bucket>:<client>:<minute>``, counted by the web.
- Worker heartbeats: ``stylequeue:worker:<name>``, a JSON record with a short TTL that
  each worker refreshes, its name in the ``stylequeue:workers`` registry; ``/readyz`` and
  the web form read them (live workers, and which backbones they can run). Nothing here
  scans the keyspace.
- Remembered speeds: ``stylequeue:speed:<host>:<device>:...``, the last speed a worker
  measured on that host and device; the next worker there starts from it instead of
  measuring again (worker/tasks.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

CANCEL_PREFIX = "stylequeue:cancel:"
WORKER_PREFIX = "stylequeue:worker:"
#: A sorted set: each worker's name, scored by when its heartbeat lapses.
WORKERS_KEY = "stylequeue:workers"
HEARTBEAT_TTL_SECONDS = 15
SPEED_PREFIX = "stylequeue:speed:"
#: How long a measured speed is trusted without a worker refreshing it: a host whose
#: workers stayed away a week may have changed (drivers, neighbours, its torch).
SPEED_TTL_SECONDS = 7 * 24 * 3600
#: Task name the web sends jobs under, whatever their mode: the queue decides which worker
#: kind runs it (shared/routing.py). The optimization workers' app (worker/tasks.py) and
#: the preview workers' (worker/previews.py, for ``mode=fast`` jobs on the preview queue)
#: each register it; both run the job through worker/lifecycle.py.
RUN_JOB_TASK = "stylequeue.run_job"
#: The instant preview of an optimization job: its feed-forward picture, made by a preview
#: worker (worker/previews.py).
PREVIEW_TASK = "stylequeue.preview_job"
#: A probe: the worker writes the time it picked the message up under the key it is given
#: (bench/service.py measures the bare queue's latency with it).
PING_TASK = "stylequeue.ping"


def celery_config(queue: str) -> dict[str, Any]:
    """What every Celery app of ours sets: tasks acknowledged when they end and given back
    if their worker dies, one message at a time, no result backend (the database row is
    the job's record), the logging ours, and ``queue`` the default."""
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queue,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
    }


# INCRBY, and EXPIRE when the window's count starts: one round trip, one command (a pipeline
# of the two costs more Python per call, and the status poll is the API's hot path).
RATE_WINDOW_SCRIPT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[2])
if count == tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def request_cancel(client: redis.Redis, job_id: str) -> None:
    client.set(CANCEL_PREFIX + job_id, "1", ex=24 * 3600)


def cancel_requested(client: redis.Redis, job_id: str) -> bool:
    """Whether a cancel was asked for; False while Redis is unreachable, so that a broker
    outage never stops a running job (the database's flag is read again at the next
    attempt)."""
    try:
        return bool(client.exists(CANCEL_PREFIX + job_id))
    except redis.RedisError:
        return False


def publish_heartbeat(
    client: redis.Redis, name: str, record: dict[str, Any], ttl: float = HEARTBEAT_TTL_SECONDS
) -> None:
    expires = time.time() + ttl
    pipe = client.pipeline(transaction=False)
    pipe.set(WORKER_PREFIX + name, json.dumps(record), px=int(ttl * 1000))
    # The registry of names: read by live_workers instead of scanning the keyspace.
    pipe.zadd(WORKERS_KEY, {name: expires})
    pipe.execute()


def remove_heartbeat(client: redis.Redis, name: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(WORKER_PREFIX + name)
    pipe.zrem(WORKERS_KEY, name)
    pipe.execute()


def remember_speed(client: redis.Redis, key: str, work_per_second: float) -> None:
    client.set(SPEED_PREFIX + key, repr(work_per_second), ex=SPEED_TTL_SECONDS)


def remembered_speed(client: redis.Redis, key: str) -> float | None:
    raw = client.get(SPEED_PREFIX + key)
    return float(raw) if raw else None


def worker_alive(client: redis.Redis, name: str) -> bool:
    return bool(client.exists(WORKER_PREFIX + name))


def live_workers(client: redis.Redis) -> list[dict[str, Any]]:
    """The heartbeats of the registered workers: names whose heartbeat lapsed are dropped
    from the registry on the way (it holds live workers only, never the keyspace)."""
    client.zremrangebyscore(WORKERS_KEY, "-inf", time.time())
    names = [name.decode() for name in client.zrange(WORKERS_KEY, 0, -1)]
    if not names:
        return []
    raws = client.mget([WORKER_PREFIX + name for name in names])
    return [json.loads(raw) for raw in raws if raw]


#: kombu's Redis transport keeps a queue's messages in one list per priority step: the
#: queue's own name, then ``<queue>\x06\x16<step>`` (kombu.transport.redis PRIORITY_STEPS).
PRIORITY_STEPS = (0, 3, 6, 9)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s ready messages."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    return sum(int(count) for count in pipe.execute())
