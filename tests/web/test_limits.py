"""Request bodies are bounded before they are read; the session key is owner-only and
its cookie Secure when asked."""

from __future__ import annotations

import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.service import service_app, service_settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Any:
    return service_settings(tmp_path_factory.mktemp("limits"), redis_url)


@pytest.fixture(scope="module")
def limited_app(settings: Any) -> Iterator[Any]:
    with service_app(settings) as app:
        yield app


def test_a_declared_oversize_body_is_refused_from_its_headers(limited_app: Any) -> None:
    limit = limited_app.config["MAX_CONTENT_LENGTH"]
    assert limit is not None
    settings = limited_app.config["SETTINGS"]
    assert limit >= settings.max_image_bytes * (1 + settings.max_styles)
    environ = {
        "CONTENT_LENGTH": str(10 * 1024**3),
        "CONTENT_TYPE": "multipart/form-data; boundary=x",
    }
    response = limited_app.test_client().post("/api/jobs", data=b"", environ_overrides=environ)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_too_large"


def test_the_session_key_file_is_owner_only(limited_app: Any) -> None:
    path = Path(limited_app.config["SETTINGS"].data_dir) / "secret_key"
    assert path.read_text().strip() == limited_app.config["SECRET_KEY"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_session_cookie_is_secure_when_asked(settings: Any) -> None:
    for secure in (False, True):
        with service_app(replace(settings, secure_cookies=secure)) as app:
            cookie = app.test_client().get("/").headers.get("Set-Cookie", "")
        assert "stylequeue_session=" in cookie
        assert ("Secure" in cookie) is secure


def test_only_the_submission_takes_a_large_body(limited_app: Any) -> None:
    from flask import request

    from web.limits import SMALL_BODY_BYTES

    cases = {("POST", "/api/jobs"): limited_app.config["MAX_CONTENT_LENGTH"],
             ("POST", f"/api/jobs/{uuid.uuid4()}/cancel"): SMALL_BODY_BYTES,
             ("GET", "/api/webhook-secret"): SMALL_BODY_BYTES}  # fmt: skip
    for (method, path), limit in cases.items():
        with limited_app.test_request_context(path, method=method):
            assert request.url_rule is not None, path
            assert request.max_content_length == limit, path
