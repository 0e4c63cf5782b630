"""The app alone, as ``create_app`` makes it: health, links, rate limits and headers."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, url_for
from flask.testing import FlaskClient

from shared import broker
from shared.config import Settings
from shared.models import Job
from stylequeue.service import start_embedded_redis
from tests.service import submit
from web import create_app, security_headers
from web.api import job_links


def test_readyz_tells_strangers_only_whether_it_is_ready(app: Flask, settings: Settings) -> None:
    # Outside the metrics networks and without an admin token: ready or not, nothing else.
    outside = dataclasses.replace(settings, metrics_networks="192.0.2.0/24")
    other = create_app({"SETTINGS": outside})
    try:
        client = other.test_client()
        stranger = client.get("/readyz")
        status = "ready" if stranger.status_code == 200 else "not ready"
        assert stranger.get_json() == {"status": status}
        inside = client.get("/readyz", environ_base={"REMOTE_ADDR": "192.0.2.7"}).get_json()
        assert inside["database"] == "ok" and inside["redis"] == "ok"
        assert "capacity" in inside and "workers" in inside
    finally:
        other.extensions["stylequeue"]["engine"].dispose()


def test_readyz_without_workers(app: Flask, settings: Settings) -> None:
    nowhere = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    other = create_app({"SETTINGS": nowhere})
    response = other.test_client().get("/readyz")
    other.extensions["stylequeue"]["engine"].dispose()
    assert response.status_code == 503
    assert response.get_json()["status"] == "not ready"
    # Health only: no broker address or driver message for an anonymous caller.
    assert response.get_json()["redis"] == "error"
    assert "127.0.0.1:1" not in response.get_data(as_text=True)


def test_job_links_are_the_routes_own_urls(app: Flask) -> None:
    job = Job(id=uuid.uuid4())
    endpoints = {"self": "api.get_job", "page": "pages.job_page", "result": "api.get_result",
                 "preview": "api.get_preview", "losses": "api.get_losses",
                 "events": "api.get_events", "cancel": "api.cancel_job",
                 "again": "api.run_again", "content": "api.get_content"}  # fmt: skip
    for script_name in ("", "/behind/a/proxy"):
        with app.test_request_context("/", base_url=f"http://localhost{script_name}"):
            expected = {k: url_for(e, job_id=str(job.id)) for k, e in endpoints.items()}
            assert job_links(job) == expected
            assert expected["result"].startswith(f"{script_name}/api/jobs/")


def test_rate_limit_holds_without_scripts_and_opens_without_redis(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    process, url = start_embedded_redis(tmp_path)
    try:
        # A user that may not run scripts, as some ACLs and managed Redis services have it.
        admin = broker.connect(url)
        admin.execute_command(
            "ACL", "SETUSER", "noscripts", "on", "nopass", "~*", "&*", "+@all", "-@scripting"
        )
        limited = url.replace("redis://", "redis://noscripts:any@")
        app = create_app(
            {"SETTINGS": dataclasses.replace(settings, redis_url=limited, rate_limit_per_minute=3)}
        )
        client = app.test_client()
        assert [client.get("/api/presets").status_code for _ in range(5)] == [200] * 3 + [429] * 2
        assert app.extensions["stylequeue"]["rate_window_script_refused"].is_set()
        assert "refused the rate-limit script" in caplog.text
    finally:
        process.terminate()
        process.wait(10)
    # Redis gone: requests are not refused for it.
    assert [client.get("/api/presets").status_code for _ in range(2)] == [200, 200]


def test_rate_limits_and_queued_jobs_per_client(
    settings: Settings, photo: bytes, painting: bytes
) -> None:
    def app_with(**limits: Any) -> Flask:
        return create_app({"SETTINGS": dataclasses.replace(settings, **limits)})

    def new_client(app: Flask) -> FlaskClient:
        """A client from an address of its own: limits are per client and per minute."""
        client = app.test_client()
        # Two octets drawn: with one, two clients shared an address once in 250 tests.
        drawn = uuid.uuid4().int
        client.environ_base["REMOTE_ADDR"] = (
            f"10.{drawn % 250}.{drawn // 250 % 250}.{os.getpid() % 250}"
        )
        return client

    api = app_with(rate_limit_per_minute=5, queue=f"limits-{uuid.uuid4().hex[:6]}")
    client = new_client(api)
    statuses = [client.get("/api/presets").status_code for _ in range(7)]
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
    limited = client.get("/api/presets")
    assert limited.get_json()["error"]["code"] == "rate_limited"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert client.get("/healthz").status_code == 200  # only the API is limited
    assert new_client(api).get("/api/presets").status_code == 200  # another client

    # Nobody consumes this queue, so the first job stays queued.
    queued = app_with(max_queued_per_client=1, queue=f"nobody-{uuid.uuid4().hex[:6]}")
    client = new_client(queued)
    first = submit(client, photo, painting, iterations=2)
    assert first.status_code == 202
    second = submit(client, photo, painting, iterations=2)
    assert second.status_code == 429
    assert "limit is 1" in second.get_json()["error"]["message"]
    client.post(first.get_json()["links"]["cancel"])
    assert submit(client, photo, painting, iterations=2).status_code == 202  # room again

    submits = app_with(submit_limit_per_minute=1, queue=f"limits-{uuid.uuid4().hex[:6]}")
    client = new_client(submits)
    assert submit(client, photo, painting, iterations=2).status_code == 202
    assert submit(client, photo, painting, iterations=2).status_code == 429
    for app in (api, queued, submits):
        app.extensions["stylequeue"]["engine"].dispose()


def test_security_headers_keep_what_a_view_set() -> None:
    response = Response("x", headers={"content-security-policy": "default-src 'none'"})
    security_headers(response)
    assert response.headers.getlist("Content-Security-Policy") == ["default-src 'none'"]
    assert response.headers.getlist("X-Frame-Options") == ["DENY"]
