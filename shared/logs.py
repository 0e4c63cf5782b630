"""Logging for the service's processes: plain text or one JSON object per line, each record
carrying the id of the job it concerns (set with :func:`job_context`)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

current_job: ContextVar[str | None] = ContextVar("current_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job_suffix)s: %(message)s"


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log records made inside carry ``job_id`` (threads started inside do not)."""
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job_id = getattr(record, "job_id", None) or current_job.get()
        record.job_id = job_id
        record.job_suffix = f" [job {job_id}]" if job_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, **static: str) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            **self.static,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, level: int = logging.INFO, **static: str) -> None:
    """One handler on the root logger; ``static`` fields (e.g. the worker's host) go in
    every JSON record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(**static))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
