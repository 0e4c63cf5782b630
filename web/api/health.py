"""The service itself: liveness, readiness, workers, presets, the signing secret."""

from __future__ import annotations

import logging
from typing import Any

from flask import (
    Response,
    jsonify,
    url_for,
)
from sqlalchemy import text

from shared import broker
from shared.errors import OptionError, Unauthorized
from shared.presets import presets
from shared.webhooks import owner_secret
from web.api import bp
from web.auth import current_principal, may_see_internals
from web.extensions import services

log = logging.getLogger(__name__)


@bp.get("/api/presets")
def list_presets() -> Response:
    return jsonify(
        {
            "presets": [
                {
                    "name": preset.name,
                    "title": preset.title,
                    "artist": preset.artist,
                    "year": preset.year,
                    "attribution": preset.attribution,
                    "url": url_for("pages.preset_image", name=preset.name),
                }
                for preset in presets().values()
            ]
        }
    )


@bp.get("/api/webhook-secret")
def webhook_secret() -> Response:
    """The secret the caller's callbacks are signed with (shared/webhooks.py)."""
    principal = current_principal()
    if principal.owner is None:
        raise Unauthorized("a signing secret belongs to a token or the web form's session")
    secret = services.settings.webhook_secret
    if not secret:
        raise OptionError("this server does not send callbacks", field="callback_url")
    return jsonify({"secret": owner_secret(secret, principal.owner), "algorithm": "HMAC-SHA256"})


#: Heartbeat fields only admins see: the job a worker runs (another client's id).
PRIVATE_WORKER_FIELDS = frozenset({"job", "jobs"})


@bp.get("/api/workers")
def list_workers() -> Response:
    workers = broker.live_workers(services.redis)
    backbones = sorted({name for w in workers for name in w.get("backbones", [])})
    if not current_principal().admin:
        # The job a worker runs is someone's: its id is for admins only.
        workers = [{k: v for k, v in w.items() if k not in PRIVATE_WORKER_FIELDS} for w in workers]
    return jsonify({"workers": workers, "backbones": backbones})


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    checks: dict[str, Any] = {}
    try:
        services.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        # The error names the database's host, user and paths: for the logs, not for
        # whoever asks.
        log.warning("readyz: database: %s", error)
        checks["database"] = "error"
    try:
        services.redis.ping()
        workers = broker.live_workers(services.redis)
        checks["redis"] = "ok"
    except Exception as error:
        log.warning("readyz: redis: %s", error)
        checks["redis"] = "error"
        workers = []
    checks["workers"] = len(workers)
    # Where jobs can run: each worker's host, device, memory and queues; not the job it
    # runs (another client's id, from which its result could be fetched).
    checks["capacity"] = [
        {key: worker.get(key) for key in ("name", "host", "kind", "device", "device_name",
                                          "memory_bytes", "queues", "backbones")}
        for worker in workers
    ]  # fmt: skip
    ready = checks["database"] == "ok" and checks["redis"] == "ok" and checks["workers"] > 0
    status = {"status": "ready" if ready else "not ready"}
    # Strangers learn ready or not; the hosts, workers, devices and queues are for admins
    # and the metrics networks (an orchestrator's probe runs from one).
    shown = {**status, **checks} if may_see_internals() else status
    return jsonify(shown), 200 if ready else 503
