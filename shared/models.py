"""The job database: jobs, their loss curves and their input images.

The ``jobs`` row is the job's truth: status, progress, latest loss, errors and the keys of
its files in storage. Celery's result backend is not used as a record.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class JobKind(StrEnum):
    """What a job is: one picture, or the parent of parts (a batch of photos, a video), or
    one of a video's runs of frames. A batch's parts are pictures."""

    PICTURE = "picture"
    BATCH = "batch"
    VIDEO = "video"
    FRAMES = "frames"

    @property
    def has_parts(self) -> bool:
        return self in (JobKind.BATCH, JobKind.VIDEO)


#: The kinds that are parents: never sent to a worker, finished when their parts are.
PARENT_KINDS = (JobKind.BATCH.value, JobKind.VIDEO.value)


class JobMode(StrEnum):
    OPTIMIZE = "optimize"
    FAST = "fast"


#: Values of ``Job.preview_source``.
PREVIEW_FEEDFORWARD = "feedforward"
PREVIEW_OPTIMIZER = "optimizer"


class StoredImage(Base):
    """An input image, stored once by the SHA-256 of its bytes."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    storage_key: Mapped[str] = mapped_column(String(200))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_client_status", "client", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    #: ``optimize`` (Gatys et al.'s optimization) or ``fast`` (the feed-forward picture
    #: only, made by a preview worker): :class:`JobMode`.
    mode: Mapped[str] = mapped_column(String(16), default="optimize", server_default="optimize")
    #: :class:`JobKind`: a picture, a batch or video (the parent of parts), a run of frames.
    kind: Mapped[str] = mapped_column(String(16), default="picture", server_default="picture")
    #: A part's parent job and its place among the parts (0-based).
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    part_index: Mapped[int | None] = mapped_column(Integer)
    #: A run of frames: ``{"start", "stop", "overlap"}``, the frames it owns and how many
    #: before ``start`` it also makes, to blend at the seam (shared/parts.py).
    frames: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: A video: what its header says (``shared.parts.VideoMedia``).
    media: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The engine options of the job: ``shared.options.RunOptions.stored()``, read back with
    #: ``RunOptions.of_job``.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    iteration: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer)
    #: Seconds the current attempt had run at ``iteration``: the base of the ETA.
    elapsed: Mapped[float | None] = mapped_column(Float)
    loss_total: Mapped[float | None] = mapped_column(Float)
    loss_content: Mapped[float | None] = mapped_column(Float)
    loss_style: Mapped[float | None] = mapped_column(Float)
    loss_tv: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))
    result_key: Mapped[str | None] = mapped_column(String(200))
    preview_key: Mapped[str | None] = mapped_column(String(200))
    #: Iteration of the latest saved preview: lets the event stream announce new ones
    #: (0: the feed-forward picture, made before the first iteration).
    preview_iteration: Mapped[int | None] = mapped_column(Integer)
    #: What made the preview at ``preview_key``: :data:`PREVIEW_FEEDFORWARD` or
    #: :data:`PREVIEW_OPTIMIZER`.
    preview_source: Mapped[str | None] = mapped_column(String(16))
    checkpoint_key: Mapped[str | None] = mapped_column(String(200))
    #: Iteration of the checkpoint at ``checkpoint_key``.
    checkpoint_iteration: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    #: The checkpoint iteration the latest attempt started from (0: from the start).
    resumed_from_iteration: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Who runs the job now, until when: a worker takes a job only if nobody holds a live
    #: lease on it, and keeps the lease alive while it runs (see worker/lease.py).
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: When the job's files were deleted, its time to live being over.
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Who submitted the job (the client's address), for per-client limits.
    client: Mapped[str | None] = mapped_column(String(200))
    #: The client's ``Idempotency-Key``: the same key and request give the same job.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    #: What determines the result (:meth:`shared.jobs.JobRequest.fingerprint`).
    request_fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    #: The finished job whose result this one reuses, instead of running again.
    reused_from: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    #: When the job's message was last sent to the broker.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The broker queue the job was routed to (by device class and size; shared/routing.py)
    #: and the memory it is estimated to need there.
    queue: Mapped[str | None] = mapped_column(String(100))
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    #: The job's work for the ETA: iterations × output pixels (see shared/estimate.py).
    work: Mapped[int | None] = mapped_column(BigInteger)
    #: Whose job it is (``token:<id>`` or ``session:<id>``; empty: anonymous). With tokens
    #: required, only its owner and admins see it.
    owner: Mapped[str | None] = mapped_column(String(200), index=True)
    #: Where to POST the signed ``job.finished`` notice (see shared/webhooks.py), and how
    #: its delivery goes: attempts made, when the next may be made, when one succeeded.
    callback_url: Mapped[str | None] = mapped_column(String(2000))
    callback_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    callback_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    callback_delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_error: Mapped[str | None] = mapped_column(Text)

    styles: Mapped[list[JobStyle]] = relationship(
        order_by="JobStyle.position", cascade="all, delete-orphan", lazy="selectin"
    )
    runs: Mapped[list[JobRun]] = relationship(
        order_by="JobRun.attempt", cascade="all, delete-orphan", lazy="selectin"
    )

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)

    @property
    def job_kind(self) -> JobKind:
        return JobKind(self.kind)


class JobStyle(Base):
    """One style image of a job, in order, with its blend weight."""

    __tablename__ = "job_styles"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"))
    weight: Mapped[float] = mapped_column(Float)
    #: The preset's name when the style came from the gallery.
    preset: Mapped[str | None] = mapped_column(String(64))


class LossPoint(Base):
    """The loss of one iteration of one job; (job, iteration) is the primary key."""

    __tablename__ = "loss_points"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    iteration: Mapped[int] = mapped_column(Integer, primary_key=True)
    total: Mapped[float] = mapped_column(Float)
    content: Mapped[float] = mapped_column(Float)
    style: Mapped[float] = mapped_column(Float)
    tv: Mapped[float] = mapped_column(Float)
    #: A video frame's temporal loss (Ruder et al.); 0 for a photo.
    temporal: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    elapsed: Mapped[float] = mapped_column(Float)


class ApiToken(Base):
    """An API token; only the SHA-256 of its secret is stored (``stylequeue token``)."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: An admin token sees and cancels every job.
    admin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def owner(self) -> str:
        return f"token:{self.id}"


class JobRun(Base):
    """One attempt at a job: where it ran (host, worker, device), from which checkpoint,
    how it ended (empty while running, or when its worker died)."""

    __tablename__ = "job_runs"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str | None] = mapped_column(String(100))
    resumed_from_iteration: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(32))
