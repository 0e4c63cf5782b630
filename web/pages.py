"""The pages: the form (``/``), a job watched live (``/jobs/<id>``) and recent jobs."""

from __future__ import annotations

import functools
from typing import Any

from flask import Blueprint, abort, g, redirect, render_template, request, send_file, url_for
from werkzeug.wrappers import Response

from shared.backbones import BACKBONES, default_backbone
from shared.errors import StylequeueError
from shared.estimate import PREVIEW_KIND
from shared.fields import bounds, choices, field_kind, form_text
from shared.options import OPTION_NAMES, Options, defaults
from shared.presets import presets
from shared.routing import GIB
from web.auth import (
    csrf_matches,
    session_needs_token,
    sign_in,
    sign_out,
    signed_in_token,
    start_browser_session,
)
from web.extensions import services

bp = Blueprint("pages", __name__)

#: The form's speed presets, shown before the raw numbers (each with its expected time).
SPEEDS = (
    {"name": "instant", "label": "Instant", "mode": "fast", "size": 512, "iterations": 300,
     "hint": "the feed-forward network alone: one pass, about a second"},
    {"name": "quick", "label": "Quick", "mode": "optimize", "size": 256, "iterations": 100,
     "hint": "256 px, 100 iterations: a first look"},
    {"name": "balanced", "label": "Balanced", "mode": "optimize", "size": 512,
     "iterations": 300, "hint": "512 px, 300 iterations: the defaults"},
    {"name": "best", "label": "Best", "mode": "optimize", "size": 768, "iterations": 500,
     "hint": "768 px, 500 iterations: finer strokes, several times longer"},
)  # fmt: skip


#: The options the form shows up front (with the speed presets); the rest are "Advanced".
BASIC_OPTIONS = ("size", "iterations", "style_strength")


@functools.cache
def option_fields() -> list[dict[str, Any]]:
    """The advanced options as the form shows them, each from the option schema: its
    kind, label, help, limits, choices and default."""
    fields = []
    for name in OPTION_NAMES:
        if name in BASIC_OPTIONS:
            continue
        info = Options.model_fields[name]
        kind = field_kind(name, Options)
        help_text = info.description or ""
        low, high = bounds(name, Options) if kind in ("int", "float") else (None, None)
        fields.append(
            {
                "name": name,
                "kind": kind,
                "label": info.title or name.replace("_", " ").capitalize(),
                "help": help_text,
                # What leaving it empty means: the help's "unset: ..." clause.
                "unset": help_text.split("unset: ", 1)[1] if "unset: " in help_text else "",
                "min": "" if low is None else f"{low:g}",
                "max": "" if high is None or high > 1e9 else f"{high:g}",
                "choices": choices(name, Options) if kind == "choice" else (),
                "value": form_text(info.default),
            }
        )
    return fields


@bp.before_request
def _browser_session() -> None:
    """Every page gives the browser its session (and the CSRF token its scripts send)."""
    g.csrf_token = start_browser_session()


@bp.get("/")
def index(sign_in_error: str | None = None) -> str:
    from web.api import live_workers, offered_backbones

    # With tokens required, the form is for those who signed in with one (web/auth.py).
    signed_in = signed_in_token() if session_needs_token() else None

    everyone = sorted(live_workers(), key=lambda worker: str(worker.get("name")))
    workers = [worker for worker in everyone if worker.get("kind") != PREVIEW_KIND]
    offered = offered_backbones(workers)
    available = offered or []
    chosen = default_backbone(offered, offline=services.settings.offline)
    return render_template(
        "index.html",
        defaults=defaults(),
        presets=list(presets().values()),
        backbones=BACKBONES,
        available=available,
        chosen_backbone=chosen,
        advanced=option_fields(),
        # The basic fields' ranges, from the schema (the service narrows the maxima).
        basic={name: [f"{limit:g}" for limit in bounds(name, Options)] for name in BASIC_OPTIONS},
        speeds=SPEEDS,
        # Workers are up, and none has trained weights: say what that means.
        offline_only=bool(available) and not any(BACKBONES[name].real for name in available),
        preview_workers=len(everyone) - len(workers),
        max_size=services.settings.max_size,
        max_iterations=services.settings.max_iterations,
        workers=workers,
        gib=GIB,
        sign_in_needed=session_needs_token() and signed_in is None,
        signed_in=signed_in,
        sign_in_error=sign_in_error,
    )


@bp.post("/sign-in")
def sign_in_page() -> Response | tuple[str, int]:
    """The form's token sign-in (tokens required): the session then acts for the token."""
    if not csrf_matches(request.form.get("csrf_token", "")):
        abort(403)
    try:
        sign_in(request.form.get("token", ""))
    except StylequeueError as error:  # unknown or revoked, or too many wrong ones
        return index(sign_in_error=error.message), error.http_status
    return redirect(url_for("pages.index"), code=303)


@bp.post("/sign-out")
def sign_out_page() -> Response:
    if not csrf_matches(request.form.get("csrf_token", "")):
        abort(403)
    sign_out()
    return redirect(url_for("pages.index"), code=303)


@bp.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    from web.api import load_job

    job = load_job(job_id)
    if job.job_kind.has_parts:  # a batch or a video: its parts' grid
        return render_template("job_parts.html", job=job)
    return render_template("job.html", job=job)


@bp.get("/jobs")
def jobs_page() -> str:
    return render_template("jobs.html")


@bp.get("/presets/<name>.jpg")
def preset_image(name: str) -> Response:
    preset = presets().get(name)
    if preset is None:
        abort(404)
    return send_file(preset.path, mimetype="image/jpeg", max_age=86400)
