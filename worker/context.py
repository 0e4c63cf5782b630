"""What a worker process opens once: settings, database, storage, Redis, its name."""

from __future__ import annotations

import os
import socket
from functools import cache, cached_property
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.config import Settings
from shared.db import make_engine, make_sessionmaker
from shared.storage import Storage, storage_from_settings
from worker.capacity import Capacity, measure
from worker.engine import BACKBONES


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

    @cached_property
    def capacity(self) -> Capacity:
        return measure(self.settings)


@cache
def context() -> Context:
    return Context()


def available_backbones() -> list[str]:
    from worker.engine.weights import WeightsLocations

    locations = WeightsLocations.from_env()
    return [
        name for name, spec in BACKBONES.items() if not spec.needs_weights or locations.find(spec)
    ]
