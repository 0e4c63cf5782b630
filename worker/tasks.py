"""The Celery glue: the task (an id in; the job runs in :mod:`worker.runner`) and the
worker's life: a warm backbone, heartbeats and the reconciler."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import redis
from celery.signals import setup_logging, worker_ready, worker_shutdown

from shared import broker
from shared.backbones import BACKBONES, default_backbone
from shared.estimate import RATE_FIELD, job_work
from shared.images import synthetic_pair
from shared.logs import job_context
from worker import runner
from worker.allocator import keep_freed_memory, release_free_memory
from worker.capacity import measure
from worker.celery_app import app
from worker.context import (
    Context,
    configure_worker_logging,
    context,
    start_heartbeat,
    stop_heartbeat,
)
from worker.engine import Iterate, stylize
from worker.reconcile import reconcile_once_elected

log = logging.getLogger(__name__)


@app.task(name=broker.RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    with job_context(job_id):
        try:
            runner.run(context(), uuid.UUID(job_id))
        finally:
            release_free_memory()  # what the job's tensors left in the heap


@app.task(name=broker.PING_TASK)
def ping(key: str) -> None:
    context().redis.set(key, repr(time.time()), ex=600)


@setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    configure_worker_logging(loglevel)


def available_backbones() -> list[str]:
    """The backbones this worker can run and offers (the ``backbones`` setting): those
    whose weights are here or, with ``STYLEQUEUE_ALLOW_DOWNLOAD=1``, can be fetched."""
    from worker.engine.weights import WeightsLocations

    locations = WeightsLocations.from_env()
    offered = {name.strip() for name in context().settings.backbones.split(",") if name.strip()}
    # A worker allowed to download fetches a backbone's weights on its first job.
    return [
        name
        for name, spec in BACKBONES.items()
        if (not offered or name in offered)
        and (not spec.needs_weights or locations.allow_download or locations.find(spec))
    ]


# --- Worker lifecycle: warm backbone and heartbeats ----------------------------------------


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    import torch

    from worker.engine.device import load_extractor, resolve_device, resolve_precision

    ctx = context()
    backbones = available_backbones()
    device = resolve_device(ctx.settings.device)
    # On the CPU the activations live in host memory: reuse them, job after job.
    if device.type == "cpu" and keep_freed_memory():
        log.info("freed memory stays in the heap for reuse (worker/allocator.py)")
    # Load the backbone jobs will most likely use now, once, not in the first job.
    backbone = default_backbone(backbones)
    precision = resolve_precision("auto", device)
    load_extractor(backbone, device=device, precision=precision)
    capacity = measure(ctx.settings)
    # A worker that follows another on this host and device (a restart, a replacement after
    # a crash) starts from the speed its predecessor measured, most often over whole jobs,
    # and is ready without a speed run of its own.
    ctx.speed_key = ":".join(
        [ctx.host, str(device), capacity.device_name, backbone, precision,
         str(torch.get_num_threads())]
    )  # fmt: skip
    try:
        remembered = broker.remembered_speed(ctx.redis, ctx.speed_key)
    except redis.RedisError:
        remembered = None
    if remembered:
        ctx.activity[RATE_FIELD] = remembered
        log.info("speed: %.1f work/s, remembered from this host's last worker", remembered)
    else:
        try:
            ctx.note_speed(measure_speed(backbone, str(device), ctx.settings.cuda_graphs))
            log.info("speed: %.1f work/s, measured", ctx.activity[RATE_FIELD])
        except Exception:  # the ETAs wait for the first job then
            log.exception("could not measure this worker's speed")
    stopped = start_heartbeat(
        ctx, kind=capacity.kind, device=str(device), queues=list(capacity.queues),
        backbones=backbones, device_name=capacity.device_name,
        memory_bytes=capacity.memory_bytes,
    )  # fmt: skip
    threading.Thread(target=_reconciler, args=(ctx, stopped), daemon=True).start()


#: The short run that gives a new worker's speed (shared/estimate.py) before its first job:
#: long side, iterations; the first iteration (setup, warm-up) is not counted.
SPEED_RUN = (128, 6)


def measure_speed(backbone: str, device: str, cuda_graphs: bool) -> float:
    """Work (pixel-iterations) per second of a short run on made-up images. Small images
    use a device less fully than real jobs, so this errs on the slow side; each finished
    job then corrects it (worker/active.py)."""
    side, iterations = SPEED_RUN
    content, style = synthetic_pair((side, side), (side, side))
    elapsed: list[float] = []

    def note(iterate: Iterate) -> bool:
        elapsed.append(iterate.elapsed)
        return False

    stylize(
        content=content, styles=[style], size=side, scales=1, iterations=iterations,
        backbone=backbone, device=device, cuda_graphs=cuda_graphs, seed=0, progress=note,
    )  # fmt: skip
    return (iterations - 1) * job_work([(side, 1)], side, side) / (elapsed[-1] - elapsed[0])


def _reconciler(ctx: Context, stopped: threading.Event) -> None:
    interval = ctx.settings.reconcile_seconds

    def enqueue(job_id: str, queue: str) -> None:
        app.send_task(broker.RUN_JOB_TASK, args=[job_id], queue=queue)

    while not stopped.wait(interval):
        try:
            reconcile_once_elected(ctx.sessions, ctx.redis, ctx.storage, ctx.settings, enqueue)
        except Exception as error:  # broker or database away: try again next time
            log.warning("reconciler: %s", error)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_heartbeat(context())
