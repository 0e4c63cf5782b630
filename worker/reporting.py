"""From engine callbacks to the database and storage, without slowing the engine down.

Loss points are buffered and written in one statement at most every
``loss_flush_seconds`` (and at the end, and before every checkpoint), never one commit per
iteration; the job's progress and latest loss are updated in the same transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy import delete, insert, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import broker
from shared.images import encode_png
from shared.models import Job, LossPoint
from shared.storage import Storage
from worker.engine import Checkpoint, Iterate

log = logging.getLogger(__name__)


def checkpoint_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/checkpoint.npz"


def preview_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/preview.png"


def result_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/result.png"


class JobReporter:
    """The ``progress`` and ``on_checkpoint`` callbacks of one job's run."""

    def __init__(
        self,
        job_id: uuid.UUID,
        sessions: sessionmaker[Session],
        storage: Storage,
        redis_client: Any,
        flush_seconds: float,
    ) -> None:
        self.job_id = job_id
        self.sessions = sessions
        self.storage = storage
        self.redis = redis_client
        self.flush_seconds = flush_seconds
        self.points: list[dict[str, Any]] = []
        self.latest: Iterate | None = None
        self.preview_iteration: int | None = None
        self.last_flush = time.monotonic()
        self.flushes = 0
        self.db_errors = 0

    def progress(self, iterate: Iterate) -> bool:
        """Buffer the loss point; flush when due. True asks the engine to stop (cancel)."""
        self.points.append(
            {
                "job_id": self.job_id,
                "iteration": iterate.iteration,
                "total": iterate.loss,
                "content": iterate.content,
                "style": iterate.style,
                "tv": iterate.tv,
                "elapsed": iterate.elapsed,
            }
        )
        self.latest = iterate
        if iterate.preview is not None:
            self.storage.put(preview_key(self.job_id), encode_png(iterate.preview))
            self.preview_iteration = iterate.iteration
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
        return broker.cancel_requested(self.redis, str(self.job_id))

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        # A checkpoint is recorded only once every point up to it is in the database, so a
        # resume from it never leaves a gap. While the database is away, the run goes on
        # and the checkpoint waits (the file of a later one replaces it).
        if not self.flush():
            return
        self.storage.put(checkpoint_key(self.job_id), checkpoint.to_bytes())
        try:
            with self.sessions.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id)
                    .values(
                        checkpoint_key=checkpoint_key(self.job_id),
                        checkpoint_iteration=checkpoint.iteration,
                    )
                )
        except DBAPIError as error:
            log.warning("job %s: checkpoint %d not recorded: %s", self.job_id,
                        checkpoint.iteration, error.orig)  # fmt: skip

    def flush(self) -> bool:
        """Write the buffered points and progress; False (points kept) if the database is
        unreachable: they are written by a later flush, nothing is lost."""
        self.last_flush = time.monotonic()
        if not self.points and self.latest is None:
            return True
        try:
            self._write()
        except DBAPIError as error:
            if self.db_errors == 0:
                log.warning("job %s: database unavailable, buffering %d loss points: %s",
                            self.job_id, len(self.points), error.orig)  # fmt: skip
            self.db_errors += 1
            return False
        if self.db_errors:
            log.info("job %s: database back after %d failed writes", self.job_id, self.db_errors)
            self.db_errors = 0
        return True

    def _write(self) -> None:
        values: dict[str, Any] = {}
        if self.latest is not None:
            values = {
                "iteration": self.latest.iteration,
                "elapsed": self.latest.elapsed,
                "loss_total": self.latest.loss,
                "loss_content": self.latest.content,
                "loss_style": self.latest.style,
                "loss_tv": self.latest.tv,
            }
        if self.preview_iteration is not None:
            values["preview_key"] = preview_key(self.job_id)
            values["preview_iteration"] = self.preview_iteration
        with self.sessions.begin() as session:
            if self.points:
                session.execute(insert(LossPoint), self.points)
            if values:
                session.execute(update(Job).where(Job.id == self.job_id).values(**values))
        self.flushes += 1
        self.points = []


def forget_points_after(session: Session, job_id: uuid.UUID, iteration: int) -> None:
    """Drop the loss points a resumed run will write again."""
    session.execute(
        delete(LossPoint).where(LossPoint.job_id == job_id, LossPoint.iteration > iteration)
    )
