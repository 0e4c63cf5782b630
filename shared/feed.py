"""A job's live feed: a Redis stream of what the worker has just written to the database.

The worker publishes each flush (its loss points, its preview) and each status change
after the database has committed it; the web processes read the feeds of the jobs their
clients watch (web/feeds.py) and pass the entries on, without asking the database. The
database stays the truth: a watcher replays from it once when it connects, and the order
"commit, then publish" makes that hand-off exact (docs/reliability.md, *Live streams*).

Publishing is best effort: when Redis is away the entry is lost, and the web's own
periodic check of the watched jobs (one query per process, whatever the number of
watchers) notices that the database has moved on and fills the gap from it.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import redis

log = logging.getLogger(__name__)

FEED_PREFIX = "stylequeue:feed:"
#: Entries a feed keeps (approximately: Redis trims in whole nodes). A watcher that falls
#: this far behind replays from the database instead.
FEED_MAXLEN = 1000
#: A feed nobody writes to any more goes away after this long (finished jobs).
FEED_TTL_SECONDS = 3600


def feed_key(job_id: uuid.UUID | str) -> str:
    return f"{FEED_PREFIX}{job_id}"


def publish(
    client: redis.Redis,
    job_id: uuid.UUID | str,
    *,
    points: list[dict[str, Any]] | None = None,
    status: str | None = None,
    preview: dict[str, Any] | None = None,
) -> bool:
    """Append one entry to the job's feed: loss points (in iteration order), a status, a
    preview (``iteration``, ``source``). Call it after the database committed the same.
    False when Redis refused it (logged; nothing else to do)."""
    fields: dict[str, str] = {}
    if points:
        fields["points"] = json.dumps(points)
    if status is not None:
        fields["status"] = status
    if preview is not None:
        fields["preview"] = json.dumps(preview)
    if not fields:
        return True
    key = feed_key(job_id)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, fields, maxlen=FEED_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.expire(key, FEED_TTL_SECONDS)
            pipe.execute()
    except redis.RedisError as error:
        log.warning("job %s: feed entry not published (the database has it): %s", job_id, error)
        return False
    return True


def decode(fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """A feed entry as :func:`publish` was given it."""
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    entry: dict[str, Any] = {}
    if "points" in text:
        entry["points"] = json.loads(text["points"])
    if "status" in text:
        entry["status"] = text["status"]
    if "preview" in text:
        entry["preview"] = json.loads(text["preview"])
    return entry
