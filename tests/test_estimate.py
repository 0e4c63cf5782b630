"""The ETA's arithmetic (shared/estimate.py): work, what is left of it, the workers' speeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shared.estimate import (
    FAST_SECONDS_FIELD,
    PREVIEW_KIND,
    RATE_FIELD,
    Speeds,
    estimate,
    job_work,
    remaining_fraction,
    smoothed,
)
from shared.jobs import scale_plan
from shared.pyramid import plan_for

PLAN = [(128, 100), (256, 100), (512, 100)]


def test_work_weighs_each_scale_by_its_pixels() -> None:
    assert job_work(PLAN, 512, 512) == 100 * (128**2 + 256**2 + 512**2)
    # A 2:1 photo has half the pixels at every scale.
    assert job_work(PLAN, 1024, 512) == 100 * (128 * 64 + 256 * 128 + 512 * 256)
    assert job_work(plan_for(512, None, 300), 512, 512) == job_work(PLAN, 512, 512)


def test_what_is_left_counts_the_finest_scale_most() -> None:
    assert remaining_fraction(PLAN, 0) == 1.0
    assert remaining_fraction(PLAN, 300) == 0.0
    whole = 128**2 + 256**2 + 512**2
    # After the coarsest scale a third of the iterations is done, but only 5 % of the work.
    assert remaining_fraction(PLAN, 100) == pytest.approx((256**2 + 512**2) / whole)
    assert remaining_fraction(PLAN, 250) == pytest.approx(0.5 * 512**2 / whole)
    assert remaining_fraction([], 3) == 0.0


def test_the_page_marks_where_each_scale_starts() -> None:
    params = {"size": 512, "scales": 3, "iterations": 301}
    assert scale_plan(params) == [
        {"size": 128, "iterations": 100, "start": 1},
        {"size": 256, "iterations": 100, "start": 101},
        {"size": 512, "iterations": 101, "start": 201},
    ]
    assert scale_plan({"size": 64}) == []  # a row from before the pyramid


def test_speeds_come_from_the_heartbeats_that_measured_them() -> None:
    speeds = Speeds.from_heartbeats(
        [
            {"kind": "cpu", RATE_FIELD: 1000.0},
            {"kind": "gpu", RATE_FIELD: 3000.0},
            {"kind": "cpu"},  # not measured yet
            {"kind": "cpu", RATE_FIELD: float("nan")},
            {"kind": PREVIEW_KIND, FAST_SECONDS_FIELD: 0.2},
            {"kind": PREVIEW_KIND, FAST_SECONDS_FIELD: 0.5},
        ]
    )
    assert speeds.rates == (1000.0, 3000.0) and speeds.workers == 4
    assert speeds.preview_workers == 2
    assert speeds.run_seconds(4000) == 2.0  # on the mean rate
    assert speeds.wait_seconds(8000) == 2.0  # the work ahead, shared by all
    assert speeds.fast_run_seconds() == 0.2
    assert smoothed(None, 10.0) == 10.0 and smoothed(10.0, 20.0) == 15.0


def test_the_estimate_says_when_it_knows_nothing() -> None:
    nobody = estimate(Speeds.from_heartbeats([]), work=1000, work_ahead=0, fast=False)
    assert nobody["total_seconds"] is None and nobody["basis"] == "none"
    assert "no worker is running" in nobody["message"]
    unmeasured = Speeds.from_heartbeats([{"kind": "cpu"}])
    unknown = estimate(unmeasured, work=1000, work_ahead=0, fast=False)
    assert unknown["total_seconds"] is None and "measured" in unknown["message"]
    measured = Speeds.from_heartbeats([{"kind": "cpu", RATE_FIELD: 100.0}])
    known = estimate(measured, work=1000, work_ahead=500, fast=False)
    assert known == {
        "run_seconds": 10.0,
        "wait_seconds": 5.0,
        "total_seconds": 15.0,
        "workers": 1,
        "basis": "measured",
        "message": "measured on 1 live worker",
    }
    fast = estimate(measured, work=0, work_ahead=500, fast=True)
    assert fast["basis"] == "none" and "preview worker" in fast["message"]


def test_a_web_process_reads_the_workers_speeds_at_most_once_a_second(
    tmp_path: Path, redis_url: str
) -> None:
    """A status poll's ETA takes the workers' speeds from a read at most SPEEDS_SECONDS
    old: a thousand polls a second cost one read of the heartbeats, not a thousand."""
    from shared import broker
    from tests.service import service_app, service_settings

    with service_app(service_settings(tmp_path, redis_url)) as app, app.app_context():
        from web.api.reads import SPEEDS_SECONDS, worker_speeds

        client = broker.connect(redis_url)
        try:
            before = worker_speeds()
            assert before.workers == 0
            broker.publish_heartbeat(client, "fast", {"kind": "cpu", RATE_FIELD: 1000.0})
            assert worker_speeds() is before  # within the second: no read
            time.sleep(SPEEDS_SECONDS)
            after = worker_speeds()
            assert (after.workers, after.rates) == (1, (1000.0,))
        finally:
            broker.remove_heartbeat(client, "fast")
            client.close()


def test_a_due_read_is_made_once_while_the_other_requests_keep_the_old_value(
    tmp_path: Path, redis_url: str
) -> None:
    """When a kept value is due, the first request reads it afresh and the requests that
    arrive meanwhile take the old one: one read, not one per waiting request."""
    import threading

    from tests.service import service_app, service_settings
    from web.api.reads import _kept

    reads: list[int] = []
    release = threading.Event()

    def slow_read() -> int:
        reads.append(len(reads))
        if len(reads) > 1:
            release.wait(2)  # the fresh read lasts until the others have asked
        return len(reads)

    with service_app(service_settings(tmp_path, redis_url)) as app:

        def ask() -> int:
            with app.app_context():
                return _kept("test", 60.0, slow_read)

        assert ask() == 1
        app.extensions["stylequeue"]["test"] = (0.0, 1)  # due (and no clock to race)
        answers: list[int] = []
        fresh = threading.Thread(target=lambda: answers.append(ask()))
        fresh.start()
        while len(reads) < 2:
            time.sleep(0.01)
        others = [ask() for _ in range(5)]  # while the fresh read is under way
        release.set()
        fresh.join(10)
        assert others == [1] * 5
        assert answers == [2]
        assert len(reads) == 2
