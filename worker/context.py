"""What a worker process opens once: settings, database, storage, Redis, its name."""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import cache
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.estimate import RATE_FIELD
from shared.logs import configure_logging
from shared.storage import Storage, storage_from_settings

log = logging.getLogger(__name__)


class Context:
    """What a worker process opens once: settings, database, storage, Redis; and what it
    tells others in its heartbeat (``activity``: the job it runs and how fast)."""

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.sessions: sessionmaker[Session] = make_sessionmaker(
            make_engine(self.settings.database_url)
        )
        self.storage: Storage = storage_from_settings(self.settings)
        self.redis = broker.connect(self.settings.redis_url)
        self.host = self.settings.host_name or socket.gethostname()
        self.name = self.settings.worker_name or f"{self.host}:{os.getpid()}"
        self.activity: dict[str, Any] = {"job": None, "iterations_per_second": 0.0}
        #: What the speed is remembered under in Redis (set when the worker is ready).
        self.speed_key: str | None = None

    def note_speed(self, work_per_second: float) -> None:
        """The worker's speed for the ETAs (shared/estimate.py): into its heartbeat, and
        remembered for the next worker on this host and device."""
        self.activity[RATE_FIELD] = round(work_per_second, 1)
        if self.speed_key is None:
            return
        try:
            broker.remember_speed(self.redis, self.speed_key, self.activity[RATE_FIELD])
        except redis.RedisError as error:  # the heartbeat carries it all the same
            log.warning("could not remember the speed: %s", error)


@cache
def context() -> Context:
    return Context()


def configure_worker_logging(loglevel: int | str | None) -> None:
    """Our log format (text or JSON, with the worker, host and job id) instead of Celery's:
    for its ``setup_logging`` signal."""
    ctx = context()
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    configure_logging(
        ctx.settings.log_format, level or logging.INFO, worker=ctx.name, host=ctx.host
    )


_stop_heartbeat = threading.Event()


def start_heartbeat(
    ctx: Context,
    *,
    kind: str,
    device: str,
    queues: list[str],
    backbones: list[str] | None = None,
    **details: Any,
) -> threading.Event:
    """Publish what the worker is (its name, host, process, ``kind``, ``device``, the
    ``queues`` it serves, the ``backbones`` it offers and any ``details``) with its
    ``activity`` every third of the heartbeat's life, on a thread of its own, until
    :func:`stop_heartbeat`; returns the event that stops it (other loops of the worker may
    wait on it too)."""
    record = {
        "name": ctx.name, "host": ctx.host, "pid": os.getpid(), "kind": kind,
        "device": device, "queues": queues, "backbones": backbones or [], **details,
    }  # fmt: skip

    def beat() -> None:
        while not _stop_heartbeat.is_set():
            try:
                current = {**record, **ctx.activity}
                ttl = ctx.settings.heartbeat_seconds
                broker.publish_heartbeat(ctx.redis, ctx.name, current, ttl)
            except Exception as error:  # the broker may be down for a while; keep trying
                log.warning("heartbeat failed: %s", error)
            _stop_heartbeat.wait(ctx.settings.heartbeat_seconds / 3)

    threading.Thread(target=beat, daemon=True).start()
    return _stop_heartbeat


def stop_heartbeat(ctx: Context) -> None:
    """Stop the heartbeat and remove it: the worker is gone at once, not when it lapses."""
    _stop_heartbeat.set()
    try:
        broker.remove_heartbeat(ctx.redis, ctx.name)
    except Exception:  # the broker may be gone already
        log.debug("could not remove the heartbeat", exc_info=True)
