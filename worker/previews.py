"""The preview worker's Celery app: the feed-forward network on a light queue.

``stylequeue preview-worker`` serves the preview queue (``<queue>.preview``) with CPU
processes that import onnxruntime but never torch, so that a job's first picture does not
wait for a GPU worker busy with a long job:

- ``stylequeue.preview_job``: an optimization job's instant preview, its feed-forward
  picture, stored as its preview (iteration 0) unless the optimizer has shown one already;
- ``stylequeue.run_job`` for a ``mode=fast`` job: the whole job, claimed, run and ended like
  any other (lease, attempts, result, callback), its picture the result.

The work itself is in worker/instant.py; optimization workers use it for ``init=fast``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown

from shared import broker
from shared.config import Settings
from shared.estimate import PREVIEW_KIND
from shared.logs import job_context
from worker.context import configure_worker_logging, context, start_heartbeat, stop_heartbeat
from worker.feedforward import get_feedforward
from worker.instant import DEVICE, make_preview, measure_fast_seconds, run_fast

log = logging.getLogger(__name__)


def make_preview_app(settings: Settings) -> Celery:
    """The preview workers' Celery app: short tasks, acknowledged when done, one at a time
    per process (a picture takes a fraction of a second)."""
    app = Celery("stylequeue-previews", broker=settings.redis_url, include=["worker.previews"])
    app.conf.update(**broker.celery_config(settings.preview_queue))
    return app


app = make_preview_app(Settings.from_env())


@app.task(name=broker.PREVIEW_TASK)
def preview_job(job_id: str) -> None:
    with job_context(job_id):
        try:
            make_preview(context(), uuid.UUID(job_id))
        except Exception:  # a preview is a nicety: the job goes on without it
            log.exception("no feed-forward preview for job %s", job_id)


@app.task(name=broker.RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    with job_context(job_id):
        run_fast(context(), uuid.UUID(job_id))


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    configure_worker_logging(loglevel)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    ctx = context()
    get_feedforward(ctx.settings.preview_threads)  # load and check the models now
    try:  # the speed the ETAs of fast jobs start from (shared/estimate.py)
        measure_fast_seconds(ctx)
    except Exception:
        log.exception("could not measure the feed-forward network's speed")
    start_heartbeat(ctx, kind=PREVIEW_KIND, device=DEVICE, queues=[ctx.settings.preview_queue])


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_heartbeat(context())
