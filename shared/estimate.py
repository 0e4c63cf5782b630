"""How long a job will take: its work, the workers' measured speed, the queue ahead of it.

A job's *work* is the sum over its pyramid's scales of iterations × pixels at that scale:
what one iteration costs grows with the pixels it runs on (the backbone's convolutions),
so a 512 px job's 100 iterations at 128, 256 and 512 px weigh 1.31 × 100 of its finest
iterations, not 3 × 100. Each worker measures its *rate* in work per second (a short run
when it starts, then every job it finishes: worker/tasks.py) and publishes it in its
heartbeat; the web divides. Preview workers publish how long a feed-forward picture takes.

What this leaves out, on purpose: the per-iteration overhead that does not grow with the
pixels (it makes small jobs a little slower than estimated), and which worker will take a
job (the queue wait is the work ahead spread over every live optimization worker).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.pyramid import scaled_pixels

#: Heartbeat fields: an optimization worker's work per second, a preview worker's seconds
#: per feed-forward picture.
RATE_FIELD = "work_per_second"
FAST_SECONDS_FIELD = "fast_seconds"
#: The kind a preview worker's heartbeat says it is.
PREVIEW_KIND = "preview"
#: Weight of the newest measurement in a worker's running rate.
RATE_SMOOTHING = 0.5


def job_work(plan: Sequence[tuple[int, int]], width: int, height: int) -> int:
    """The work of a pyramid ``plan`` (``(long side, iterations)`` per scale) on a content
    image of ``width`` × ``height``."""
    return sum(iterations * scaled_pixels(width, height, side) for side, iterations in plan)


def remaining_fraction(plan: Sequence[tuple[int, int]], iteration: int) -> float:
    """The share of a plan's work still to do after ``iteration`` (counted over all
    scales): the iterations left at each scale, weighted by its pixels."""
    total = left = 0.0
    start = 0
    for side, iterations in plan:
        weight = float(side) ** 2
        total += iterations * weight
        left += min(iterations, max(0, start + iterations - iteration)) * weight
        start += iterations
    return left / total if total else 0.0


def smoothed(previous: float | None, measured: float) -> float:
    """A worker's running rate after a new measurement."""
    if previous is None or previous <= 0:
        return measured
    return (1 - RATE_SMOOTHING) * previous + RATE_SMOOTHING * measured


@dataclass(frozen=True)
class Speeds:
    """What the live workers' heartbeats say of their speed."""

    #: Work per second of each optimization worker that has measured it.
    rates: tuple[float, ...]
    #: Seconds per feed-forward picture of each preview worker that has measured it.
    fast_seconds: tuple[float, ...]
    #: Live optimization workers and preview workers, measured or not.
    workers: int
    preview_workers: int

    @classmethod
    def from_heartbeats(cls, heartbeats: Iterable[Mapping[str, Any]]) -> Speeds:
        rates, fast, workers, previews = [], [], 0, 0
        for beat in heartbeats:
            if beat.get("kind") == PREVIEW_KIND:
                previews += 1
                value = beat.get(FAST_SECONDS_FIELD)
                if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                    fast.append(float(value))
            else:
                workers += 1
                value = beat.get(RATE_FIELD)
                if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                    rates.append(float(value))
        return cls(tuple(rates), tuple(fast), workers, previews)

    @property
    def total_rate(self) -> float:
        return sum(self.rates)

    def run_seconds(self, work: int) -> float | None:
        """A job of ``work`` on a typical live worker (the mean rate); None unmeasured."""
        if not self.rates:
            return None
        return work / (self.total_rate / len(self.rates))

    def wait_seconds(self, work_ahead: float) -> float | None:
        """Until the work ahead of a job is done by all the measured workers together."""
        if work_ahead <= 0:
            return 0.0
        if not self.rates:
            return None
        return work_ahead / self.total_rate

    def fast_run_seconds(self) -> float | None:
        return min(self.fast_seconds) if self.fast_seconds else None


def estimate(speeds: Speeds, *, work: int, work_ahead: float, fast: bool) -> dict[str, Any]:
    """The estimate the form and the job's JSON show: seconds to run, to wait, in all;
    ``basis`` says whether it rests on measurements, ``message`` says it in words."""
    if fast:
        run = speeds.fast_run_seconds()
        wait: float | None = 0.0
        workers = speeds.preview_workers
        unmeasured = "no preview worker has measured its speed yet"
        absent = "no preview worker is running: the job will wait in the queue"
    else:
        run = speeds.run_seconds(work)
        wait = speeds.wait_seconds(work_ahead)
        workers = speeds.workers
        unmeasured = "no worker has measured its speed yet"
        absent = "no worker is running: the job will wait in the queue"
    if workers == 0:
        message = absent
    elif run is None or wait is None:
        message = unmeasured
    else:
        message = f"measured on {workers} live worker{'s' if workers != 1 else ''}"
    total = run + wait if run is not None and wait is not None and workers > 0 else None
    return {
        "run_seconds": None if run is None else round(run, 1),
        "wait_seconds": None if wait is None else round(wait, 1),
        "total_seconds": None if total is None else round(total, 1),
        "workers": workers,
        "basis": "measured" if total is not None else "none",
        "message": message,
    }
