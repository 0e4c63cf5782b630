"""From engine callbacks to the database and storage, without slowing the engine down.

Loss points are buffered and written in one statement at most every
``loss_flush_seconds`` (and at the end, and before every checkpoint), never one commit per
iteration; the job's progress and latest loss are updated in the same transaction. The
writing happens on a thread of its own, off the engine's path.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from PIL import Image
from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import broker, feed
from shared.db import insert_ignoring_duplicates
from shared.images import PREVIEW_COMPRESS_LEVEL, encode_png
from shared.models import PREVIEW_OPTIMIZER, Job, LossPoint
from shared.storage import Storage, checkpoint_key, preview_key
from worker.engine.checkpoint import Checkpoint
from worker.engine.types import Iterate

log = logging.getLogger(__name__)


class JobReporter:
    """The ``progress`` and ``on_checkpoint`` callbacks of one job's run.

    ``progress`` only appends to a buffer and reads a flag: a writer thread encodes and
    stores previews, writes the buffered points every ``flush_seconds`` and checks for a
    cancel every ``CANCEL_POLL_SECONDS``, so that neither PNG encoding nor a database or
    Redis round trip sits between two iterations (at 100 iterations a second, one preview
    encode would outlast several iterations). ``checkpoint`` hands the checkpoint to that thread
    too, so that no upload of it (to ``s3://`` storage, say) waits between two iterations.
    ``flush`` writes synchronously.
    """

    CANCEL_POLL_SECONDS = 0.1

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
        #: The newest preview not yet stored (an older one is simply replaced).
        self.pending_preview: tuple[int, Image.Image] | None = None
        self.preview_iteration: int | None = None
        self.last_flush = time.monotonic()
        self.flushes = 0
        self.db_errors = 0
        self.cancel = False
        #: The newest checkpoint not yet written (an older one is simply replaced).
        self.pending_checkpoint: Checkpoint | None = None
        self._checkpoint_due = threading.Event()  # wakes the writer for it
        self._buffer_lock = threading.Lock()  # the buffer, between engine and writer
        self._write_lock = threading.Lock()  # one writer at a time
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, daemon=True)
        self._writer.start()

    def progress(self, iterate: Iterate) -> bool:
        """Buffer the loss point (and preview). True asks the engine to stop (cancel)."""
        point = {
            "job_id": self.job_id,
            "iteration": iterate.iteration,
            "total": iterate.loss,
            "content": iterate.content,
            "style": iterate.style,
            "tv": iterate.tv,
            "temporal": iterate.temporal,
            "elapsed": iterate.elapsed,
        }
        with self._buffer_lock:
            self.points.append(point)
            self.latest = iterate
            if iterate.preview is not None:
                self.pending_preview = (iterate.iteration, iterate.preview)
        return self.cancel

    def _write_loop(self) -> None:
        last_cancel_check = 0.0
        while True:
            self._checkpoint_due.wait(min(self.CANCEL_POLL_SECONDS, self.flush_seconds))
            if self._closing.is_set():
                break
            try:
                self._write_checkpoint()
            except Exception:  # a checkpoint only shortens a resume: the run goes on
                log.exception("job %s: writing a checkpoint failed", self.job_id)
            now = time.monotonic()
            if now - last_cancel_check >= self.CANCEL_POLL_SECONDS:
                last_cancel_check = now
                self.cancel = self.cancel or broker.cancel_requested(self.redis, str(self.job_id))
            if now - self.last_flush >= self.flush_seconds:
                try:
                    self.flush()
                except Exception:  # never let the writer die: the final flush reports it
                    log.exception("job %s: writing progress failed", self.job_id)

    def close(self) -> None:
        """Stop the writer thread (the caller then flushes what is left). A checkpoint
        still pending is dropped: the run has ended, and if its lease was lost, the job's
        files are another worker's now."""
        self._closing.set()
        self._checkpoint_due.set()
        self._writer.join()

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Hand ``checkpoint`` to the writer thread (the engine's ``on_checkpoint``)."""
        with self._buffer_lock:
            self.pending_checkpoint = checkpoint
        self._checkpoint_due.set()

    def _write_checkpoint(self) -> None:
        with self._buffer_lock:
            checkpoint, self.pending_checkpoint = self.pending_checkpoint, None
            self._checkpoint_due.clear()
        if checkpoint is None:
            return
        # A checkpoint is recorded only once every point up to it is in the database, so a
        # resume from it never leaves a gap. While the database is away, the run goes on
        # without it (a later one takes its place).
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
        """Write the buffered points, progress and preview; False (points kept) if the
        database is unreachable: they are written by a later flush, nothing is lost."""
        with self._write_lock:
            self.last_flush = time.monotonic()
            with self._buffer_lock:
                points, self.points = self.points, []
                # The progress is written once: a flush with nothing new writes nothing.
                latest, self.latest = self.latest, None
                preview, self.pending_preview = self.pending_preview, None
            if not points and latest is None and preview is None:
                return True
            try:
                self._write(points, latest, preview)
            except Exception as error:  # the database or the storage is away
                with self._buffer_lock:  # put them back, before any newer ones
                    self.points = points + self.points
                    self.latest = self.latest or latest
                    self.pending_preview = self.pending_preview or preview
                if self.db_errors == 0:
                    log.warning("job %s: cannot write, buffering %d loss points: %s",
                                self.job_id, len(self.points),
                                getattr(error, "orig", None) or error)  # fmt: skip
                self.db_errors += 1
                return False
            if self.db_errors:
                log.info("job %s: database back after %d failed writes", self.job_id,
                         self.db_errors)  # fmt: skip
                self.db_errors = 0
            return True

    def _write(
        self,
        points: list[dict[str, Any]],
        latest: Iterate | None,
        preview: tuple[int, Image.Image] | None,
    ) -> None:
        values: dict[str, Any] = {}
        stored_preview = None
        if preview is not None:
            try:  # a preview is a nicety: storage trouble must not hold up the loss points
                image = encode_png(preview[1], compress_level=PREVIEW_COMPRESS_LEVEL)
                self.storage.put(preview_key(self.job_id), image)
                self.preview_iteration = stored_preview = preview[0]
            except Exception as error:
                log.warning("job %s: preview not stored: %s", self.job_id, error)
        if latest is not None:
            values = {
                "iteration": latest.iteration,
                "elapsed": latest.elapsed,
                "loss_total": latest.loss,
                "loss_content": latest.content,
                "loss_style": latest.style,
                "loss_tv": latest.tv,
            }
        if self.preview_iteration is not None:
            values["preview_key"] = preview_key(self.job_id)
            values["preview_iteration"] = self.preview_iteration
            values["preview_source"] = PREVIEW_OPTIMIZER
        with self.sessions.begin() as session:
            if points:
                # Idempotent: a write that committed but whose answer was lost (the
                # connection dropped) is sent again on the next flush. One statement
                # with the points as parameters ("executemany") is compiled once per
                # process, where a VALUES list would be compiled anew for each count of
                # points (bench/service.py: loss points a reporter writes per second).
                session.execute(insert_ignoring_duplicates(session, LossPoint), points)
            if values:
                session.execute(update(Job).where(Job.id == self.job_id).values(**values))
        self.flushes += 1
        # Committed: now the watchers' live feed (shared/feed.py), never before.
        feed.publish(
            self.redis,
            self.job_id,
            points=[{k: v for k, v in point.items() if k != "job_id"} for point in points],
            preview=None
            if stored_preview is None
            else {"iteration": stored_preview, "source": PREVIEW_OPTIMIZER},
        )


def forget_points_after(session: Session, job_id: uuid.UUID, iteration: int) -> None:
    """Drop the loss points a resumed run will write again."""
    session.execute(
        delete(LossPoint).where(LossPoint.job_id == job_id, LossPoint.iteration > iteration)
    )
