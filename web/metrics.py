"""``/metrics`` for Prometheus, read at scrape time from the truth: the database (jobs by
status, failures by code, recent job durations), Redis (queue depths, the workers'
heartbeats with their iterations per second). Nothing is counted in the web process, so
every web replica answers the same."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from shared import broker
from shared.errors import StylequeueError
from shared.models import Job, JobStatus, utcnow
from shared.routing import all_queues
from web.auth import may_see_internals
from web.extensions import services

bp = Blueprint("metrics", __name__)

#: Job durations are summarized over the jobs finished this recently.
DURATION_WINDOW = timedelta(hours=1)


def queue_depths(redis_client: Any, queues: list[str]) -> dict[str, int]:
    """Ready messages per queue, its priority sub-lists summed: the queues named, never
    a scan of the keyspace."""
    return {queue: broker.queue_depth(redis_client, queue) for queue in queues}


class ServiceCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        session = services.session
        settings = services.settings
        jobs = GaugeMetricFamily("stylequeue_jobs", "Jobs by status", labels=["status"])
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs

        failures = GaugeMetricFamily(
            "stylequeue_job_failures", "Failed jobs by error code", labels=["code"]
        )
        for code, count in session.execute(
            select(Job.error_code, func.count())
            .where(Job.status == JobStatus.FAILED)
            .group_by(Job.error_code)
        ).all():
            failures.add_metric([code or "unknown"], count)
        yield failures

        durations = [
            (finished - started).total_seconds()
            for started, finished in session.execute(
                select(Job.started_at, Job.finished_at).where(
                    Job.status == JobStatus.SUCCEEDED,
                    Job.finished_at >= utcnow() - DURATION_WINDOW,
                    Job.started_at.is_not(None),
                    Job.reused_from.is_(None),
                )
            ).all()
        ]
        yield SummaryMetricFamily(
            "stylequeue_job_duration_seconds",
            "Start to finish of the jobs that succeeded in the last hour",
            count_value=len(durations),
            sum_value=sum(durations),
        )

        depth = GaugeMetricFamily(
            "stylequeue_queue_depth", "Messages waiting per queue", labels=["queue"]
        )
        workers_up = GaugeMetricFamily(
            "stylequeue_workers", "Live workers by kind", labels=["kind"]
        )
        speed = GaugeMetricFamily(
            "stylequeue_worker_iterations_per_second",
            "Each worker's speed on its current job (0 when idle)",
            labels=["worker", "host", "device"],
        )
        memory = GaugeMetricFamily(
            "stylequeue_worker_memory_bytes",
            "Memory each worker offers jobs",
            labels=["worker", "host", "device"],
        )
        try:
            workers = broker.live_workers(services.redis)
            # Empty queues do not exist in Redis: those the workers consume count as 0.
            # The queues a job can be routed to, and any a live worker consumes.
            known = {*all_queues(settings.queue), *(q for w in workers for q in w["queues"])}
            depths = queue_depths(services.redis, sorted(known))
        except Exception:  # the broker is away: no queue or worker figures this time
            workers, depths = [], {}
        for queue, count in sorted(depths.items()):
            depth.add_metric([queue], count)
        kinds: dict[str, int] = {}
        for worker in workers:
            kinds[worker.get("kind", "cpu")] = kinds.get(worker.get("kind", "cpu"), 0) + 1
            labels = [str(worker.get(key, "")) for key in ("name", "host", "device")]
            speed.add_metric(labels, float(worker.get("iterations_per_second") or 0.0))
            memory.add_metric(labels, float(worker.get("memory_bytes") or 0))
        for kind in ("gpu", "cpu"):
            workers_up.add_metric([kind], kinds.get(kind, 0))
        yield from (depth, workers_up, speed, memory)


class MetricsForbidden(StylequeueError):
    code = "forbidden"
    http_status = 403


@bp.get("/metrics")
def metrics() -> Response:
    if not may_see_internals():
        raise MetricsForbidden(
            "/metrics answers clients in STYLEQUEUE_METRICS_NETWORKS or an admin token"
        )
    from web.api import check_rate

    check_rate("api", services.settings.rate_limit_per_minute)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector())
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
