"""Who is asking and how often: every API request is authenticated and counted."""

from __future__ import annotations

import time

import redis
from flask import (
    request,
)

from shared.errors import RateLimited
from web.api import bp
from web.auth import current_principal, require_access
from web.extensions import services


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
