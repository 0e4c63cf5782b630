"""Deliver finished jobs' callbacks: claimed in the database, signed, retried with backoff.

A job with a ``callback_url`` has ``callback_next_at`` set from its submission on. Once the
job is finished and that moment has passed, a worker claims the delivery by pushing
``callback_next_at`` into the future (one atomic ``UPDATE``, so two workers never send the
same attempt) and POSTs. Success clears ``callback_next_at``; a failure leaves it at the
backoff time (``webhook_retry_seconds`` × 2^(attempt − 1), at most an hour), until
``webhook_max_attempts`` have failed. Delivery is at least once: a worker killed between
the POST and recording it sends again, so receivers deduplicate on the job id.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import webhooks
from shared.config import Settings
from shared.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

FINISHED = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
MAX_BACKOFF_SECONDS = 3600.0
CLAIM_SECONDS = webhooks.DELIVERY_TIMEOUT_SECONDS * 3


def backoff_seconds(settings: Settings, attempt: int) -> float:
    return float(min(settings.webhook_retry_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))


def payload(job: Job) -> dict[str, Any]:
    """What the receiver gets: enough to act without asking (and the id to ask more)."""
    return {
        "event": "job.finished",
        "job": {
            "id": str(job.id),
            "status": job.status,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "iteration": job.iteration,
            "total": job.total,
            "loss": job.loss_total,
            "attempts": job.attempts,
            "error": {"code": job.error_code, "message": job.error_message}
            if job.status == JobStatus.FAILED
            else None,
        },
    }


def _claim(session: Session, job: Job, settings: Settings) -> int | None:
    """Take the next delivery attempt of ``job``; its number, or None if another took it."""
    attempt = job.callback_attempts + 1
    taken = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.callback_attempts == job.callback_attempts,
            Job.callback_next_at == job.callback_next_at,
        )
        .values(
            callback_attempts=attempt,
            # Held for longer than a delivery can take, so nobody sends this attempt again
            # while it is in flight; the outcome sets the real next time.
            callback_next_at=utcnow() + timedelta(seconds=CLAIM_SECONDS),
        )
    )
    return attempt if taken.rowcount else None  # type: ignore[attr-defined]


def deliver_due(
    sessions: sessionmaker[Session], settings: Settings, job_id: uuid.UUID | None = None
) -> int:
    """Send every due callback (or only ``job_id``'s); returns how many were delivered."""
    secret = settings.webhook_secret
    if not secret:
        return 0
    delivered = 0
    query = (
        select(Job)
        .where(Job.callback_next_at <= utcnow(), Job.status.in_(FINISHED))
        .order_by(Job.callback_next_at)
        .limit(20)
    )
    if job_id is not None:
        query = query.where(Job.id == job_id)
    with sessions() as session:
        due = session.scalars(query).all()
        for job in due:
            attempt = _claim(session, job, settings)
            session.commit()
            if attempt is None:
                continue
            values: dict[str, Any]
            try:
                # The allow-list is checked again: it may have shrunk since submission.
                url = webhooks.check_callback_url(job.callback_url or "", settings)
                signing = webhooks.owner_secret(secret, job.owner)
                webhooks.post(url, payload(job), signing, settings)
            except Exception as error:
                # The submitter sees a generic reason; the details are for the log.
                message = getattr(error, "public", None) or "the delivery failed"
                log.warning("callback of job %s, attempt %d: %s", job.id, attempt, error)
                retry_at = utcnow() + timedelta(seconds=backoff_seconds(settings, attempt))
                values = {"callback_error": message, "callback_next_at": retry_at}
                if attempt >= settings.webhook_max_attempts:
                    values["callback_next_at"] = None  # given up; the error says why
            else:
                values = {"callback_delivered_at": utcnow(), "callback_next_at": None,
                          "callback_error": None}  # fmt: skip
                delivered += 1
            # Only if no later attempt has started since (ours outlived its claim).
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.callback_attempts == attempt)
                .values(**values)
            )
            session.commit()
    return delivered
