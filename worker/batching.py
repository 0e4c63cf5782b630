"""Batching on a worker: which queued jobs may run in one batch with the job it claimed
(the engine's batch key, the worker's memory), and running them together.

A run's life (its lease, reports, ending) is worker/active.py's and worker/lifecycle.py's;
this module knows the engine's batches and the database's queued jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from shared.models import Job, JobKind, JobStatus, StoredImage
from shared.options import RunOptions
from worker.active import ActiveRun
from worker.capacity import measure
from worker.context import Context
from worker.engine import PreparedRun, Result, batch_key, prepare, stylize, stylize_together
from worker.lease import Claim
from worker.lifecycle import claim_runnable

log = logging.getLogger(__name__)

#: Queued jobs looked at when a worker fills a batch.
BATCH_CANDIDATES = 50


def claim_partners(ctx: Context, leader: ActiveRun) -> list[Claim]:
    """Claim queued jobs that can run in one batch with ``leader``: same batch key (the
    engine's, from their stored options and content size), on this worker's queues, fresh
    (no checkpoint), oldest first, while the batch's memory (each job's estimate, as routing
    made it) fits what the worker offers. On an error midway (the database away, say), the
    jobs claimed so far (perhaps none: the leader then runs alone)."""
    settings = ctx.settings
    if (
        settings.batch_jobs <= 1
        or leader.resume_from is not None
        or leader.options.size > settings.batch_size_limit(leader.device)
    ):
        return []
    key = batch_key(leader.options, leader.inputs.content.size, leader.device)
    partners: list[Claim] = []
    try:
        _claim_into(ctx, leader, key, partners)
    except Exception:  # the database away, say: the batch is what was claimed so far
        log.exception("batch: could not look for more queued jobs")
    return partners


def _claim_into(ctx: Context, leader: ActiveRun, key: Any, partners: list[Claim]) -> None:
    """Append to ``partners`` each job claimed, as it is: a database error midway keeps
    those claimed before it."""
    capacity = measure(ctx.settings)
    with ctx.sessions() as session:
        candidates = session.execute(
            select(Job.id, Job.params, Job.memory_bytes, StoredImage.width, StoredImage.height)
            .join(StoredImage, StoredImage.sha256 == Job.content_sha256)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.kind == JobKind.PICTURE,  # a video's runs go frame by frame, alone
                Job.cancel_requested.is_(False),
                Job.checkpoint_key.is_(None),
                Job.queue.in_(capacity.queues),
                Job.id != leader.claim.job_id,
            )
            .order_by(Job.created_at)
            .limit(BATCH_CANDIDATES)
        ).all()
    memory = leader.memory_bytes
    for job_id, params, memory_bytes, width, height in candidates:
        if len(partners) + 1 >= ctx.settings.batch_jobs:
            break
        if batch_key(RunOptions.of_job(params), (width, height), leader.device) != key:
            continue
        if memory + (memory_bytes or 0) > capacity.memory_bytes:
            break
        claim = claim_runnable(ctx, job_id, leader.device)  # None: taken, or out of attempts
        if claim is not None:
            partners.append(claim)
            memory += memory_bytes or 0


def run_engine(ctx: Context, runs: Sequence[ActiveRun]) -> None:
    """Run the runs' jobs, one alone or several as batches, and end each as soon as its
    run ends: a job canceled mid-batch is canceled then, not when the batch ends."""
    if len(runs) == 1:
        try:
            outcome: Result | Exception = stylize(**runs[0].arguments())
        except Exception as error:
            outcome = error
        runs[0].settle(ctx, outcome)
        return
    groups: dict[Any, list[tuple[ActiveRun, PreparedRun]]] = {}
    for index, active in enumerate(runs):
        try:
            run = prepare(**active.arguments())
        except Exception as error:  # this job's own inputs or options: it alone fails
            active.settle(ctx, error)
            continue
        # One group unless a run cannot share it: an image decoded to another size than
        # its row says, or a checkpoint written since the partner was chosen.
        groups.setdefault(run.batch_key or ("alone", index), []).append((active, run))
    for group in groups.values():

        def on_result(index: int, outcome: Result | Exception, group: Any = group) -> None:
            group[index][0].settle(ctx, outcome)

        try:
            stylize_together([run for _, run in group], on_result=on_result)
        except Exception as error:  # the batch's own failure: every job still in it
            for active, _ in group:
                if not active.ended:
                    active.settle(ctx, error)
