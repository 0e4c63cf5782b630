"""The Celery application of the workers: ``celery -A worker.celery_app worker``.

Configured for long jobs: a message is acknowledged only when its job ends (``acks_late``),
is given back to the queue if the worker process dies (``reject_on_worker_lost``), each
worker holds one message at a time (prefetch 1, none while busy), and Redis redelivers an
unacknowledged message only after a visibility timeout longer than the longest allowed job.
A worker killed outright is not waited for that long: its job's lease expires and the
reconciler (``worker/reconcile.py``) queues it again.
"""

from __future__ import annotations

from celery import Celery

from shared.broker import celery_config
from shared.config import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("stylequeue", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        **celery_config(settings.queue),
        # Fetch a message only when free to run it: a worker busy with a long job must not
        # sit on the next job's message (Redis transport only; Celery ≥ 5.6).
        worker_disable_prefetch=True,
        broker_transport_options={"visibility_timeout": settings.hard_time_limit + 3600},
    )
    return app


settings = Settings.from_env()
app = make_celery(settings)
