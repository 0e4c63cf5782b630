"""The Flask front end: the web form and pages, and the JSON API.

It never imports torch (an import contract in pyproject.toml): it validates with
``shared``, stores inputs, writes the job row and sends the task to Redis by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.config import Settings

#: Room for a submission's text fields beside its images.
FORM_TEXT_BYTES = 1024 * 1024
#: Parts of one multipart body: a job's fields are a few dozen at most.
MAX_FORM_PARTS = 100


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The application; ``test_config`` may hold ``SETTINGS`` (a :class:`Settings`)."""
    app = Flask(__name__)
    # The form's session cookie: not sent on cross-site subrequests, not readable by scripts.
    app.config.update(SESSION_COOKIE_NAME="stylequeue_session", SESSION_COOKIE_SAMESITE="Lax")
    settings = Settings.from_env()
    if test_config is not None:
        app.config.update(test_config)
        settings = app.config.get("SETTINGS", settings)
    app.config["SETTINGS"] = settings
    app.config["SESSION_COOKIE_SECURE"] = settings.secure_cookies
    # Flask refuses (400) a request whose Host is not one of these (Settings.trusted_hosts).
    if app.config.get("TRUSTED_HOSTS") is None:
        app.config["TRUSTED_HOSTS"] = settings.trusted_host_list()
    if settings.proxy_hops > 0:
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    # Every request's body is bounded before it is read: room for the content image, the
    # most style images a job may have and the form's text fields. Flask's own config
    # already holds MAX_CONTENT_LENGTH = None, so a setdefault would leave it unbounded.
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = (
            settings.max_image_bytes * (settings.max_batch_photos + settings.max_styles)
            + FORM_TEXT_BYTES
        )
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    # Text parts and urlencoded bodies (web/limits.py): a job's fields fit many times over.
    app.config["MAX_FORM_MEMORY_SIZE"] = FORM_TEXT_BYTES
    from web.limits import BoundedRequest, close_upload_parts

    app.request_class = BoundedRequest
    app.teardown_request(close_upload_parts)
    from web.auth import secret_key

    if not app.config.get("SECRET_KEY"):  # Flask's default is None
        app.config["SECRET_KEY"] = secret_key(app)

    from web import api, metrics, pages
    from web.extensions import services

    services.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(api.docs.assets)
    app.register_blueprint(pages.bp)
    app.register_blueprint(metrics.bp)
    app.after_request(security_headers)
    return app


# Scripts and styles come only from our own files: no inline code, no CDN.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
)


def security_headers(response: Response) -> Response:
    """Each of SECURITY_HEADERS unless the view set its own, in one pass over the
    response's headers (four ``setdefault`` calls scanned them eight times: 11 µs a
    response instead of 4 µs)."""
    present = {key.lower() for key, _ in response.headers.items()}
    response.headers.extend(
        [(key, value) for key, value in SECURITY_HEADERS if key.lower() not in present]
    )
    return response
