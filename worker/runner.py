"""One optimization task on a worker: claim the job (worker/lifecycle.py), begin its run
(worker/active.py) with the queued jobs that can share its batch (worker/batching.py), run
the engine and end each. No Celery here: worker/tasks.py calls :func:`run`."""

from __future__ import annotations

import logging
import uuid

from shared.errors import StylequeueError
from shared.models import JobKind
from worker import frames, lifecycle
from worker.active import ActiveRun
from worker.batching import claim_partners, run_engine
from worker.context import Context

log = logging.getLogger(__name__)


def run(ctx: Context, job_uuid: uuid.UUID) -> None:
    """Run one job: claim it, load its inputs (and checkpoint), run the engine, report.

    Queued jobs that can share its batch (``batch_jobs``, ``batch_max_size``) are claimed
    too and run with it, each with its own lease, reporter and ending; their own messages
    find them taken and are dropped (:func:`worker.lifecycle.drop_unclaimable`).
    """
    from worker.engine.device import resolve_device  # torch: only on this worker's path

    device = str(resolve_device(ctx.settings.device))
    claim = lifecycle.begin(ctx, job_uuid, device)
    if claim is None:
        return
    if claim.kind == JobKind.FRAMES:  # a video's run of frames: one after another, alone
        frames.run(ctx, claim, device)
        return
    try:
        leader = ActiveRun.begin(ctx, claim, device)
    except StylequeueError as error:  # its options cannot run here (init=fast, no model)
        lifecycle.fail(ctx, claim, error)
        return
    except Exception:  # its inputs unreadable, say: back to the queue, a limited number of times
        log.exception("job %s: could not start it", job_uuid)
        lifecycle.release(ctx, claim)
        return
    runs = [leader]
    try:
        for partner in claim_partners(ctx, leader):
            try:
                runs.append(ActiveRun.begin(ctx, partner, leader.device))
            except Exception:
                log.exception("job %s: could not start it in this batch", partner.job_id)
                lifecycle.release(ctx, partner)
        for active in runs:
            active.batch = runs
        if len(runs) > 1:
            log.info("running %d jobs as one batch: %s", len(runs),
                     ", ".join(str(a.claim.job_id) for a in runs))  # fmt: skip
        run_engine(ctx, runs)
    finally:
        for active in runs:
            if not active.ended:  # an exception got here first
                active.stop()
        ctx.activity.update(job=None, iterations_per_second=0.0)
