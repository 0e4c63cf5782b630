"""Job requests: parse and validate a submission, store its images, create its row.

Used by the API and the web form alike. Validation happens before anything is written: a
rejected request leaves no row and no file behind.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import typing
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.errors import OptionError
from shared.images import ImageInfo, probe_image
from shared.models import Job, JobStatus, JobStyle, StoredImage, utcnow
from shared.presets import presets
from shared.routing import job_memory_bytes
from shared.storage import Storage
from shared.webhooks import check_callback_url
from worker.engine.stylize import (
    INIT_CHOICES,
    check_image_sizes,
    check_options,
    defaults,
    lbfgs_history_for,
    pyramid,
    scaled_pixels,
    style_side,
    stylize,
)

#: Engine options a job may set, by the name of ``stylize``'s parameter.
JOB_OPTIONS = (
    "style_scale", "size", "scales", "iterations", "content_weight", "style_strength",
    "style_weight", "tv_weight", "content_layers", "style_layers", "style_layer_weights",
    "init", "optimizer", "lr", "lbfgs_history", "backbone", "pooling", "original_colors",
    "seed", "precision",
)  # fmt: skip
FORM_FIELDS = {
    "content", "style", "style_preset", "style_weights", "reuse", "callback_url", *JOB_OPTIONS,
}  # fmt: skip


@dataclass
class Upload:
    field: str
    filename: str
    data: bytes


@dataclass
class JobRequest:
    """A validated submission: the images (bytes, and what their headers say) and the
    normalized options."""

    content: tuple[bytes, ImageInfo]
    styles: list[tuple[bytes, ImageInfo, str | None]]  # bytes, header, preset name
    options: dict[str, Any]
    style_weights: list[float] = field(default_factory=list)
    #: The seed was given by the client (not drawn): the result is reproducible.
    seed_given: bool = False
    #: False when the client opted out of result reuse (``reuse=false``).
    reuse: bool = True
    #: Where to POST the signed notice when the job finishes (an allowed host).
    callback_url: str | None = None

    def memory_bytes(self) -> int:
        """An upper estimate of the memory the job needs where it runs (shared/routing.py),
        its styles at the finest scale included."""
        size = self.options["size"]
        # The finest scale's long side: the output's (pyramid() ends there).
        finest = pyramid(size, self.options["scales"], self.options["iterations"])[-1][0]
        style_pixels = []
        for _, info, _ in self.styles:
            side = style_side(info.size, finest, self.options)
            style_pixels.append(scaled_pixels(info.size, side))
        output_pixels = scaled_pixels(self.content[1].size, finest)
        return job_memory_bytes(
            output_pixels=output_pixels,
            optimizer=self.options["optimizer"],
            lbfgs_history=lbfgs_history_for(output_pixels, self.options["lbfgs_history"]),
            style_pixels=style_pixels,
            input_pixels=sum(info.width * info.height for _, info, _ in self.all_images()),
        )

    def all_images(self) -> list[tuple[bytes, ImageInfo, str | None]]:
        return [(*self.content, None), *self.styles]

    def fingerprint(self) -> str:
        """SHA-256 of what determines the result: input bytes, weights and options.

        A drawn seed is left out, so that resending a request is recognised as the same.
        """
        options = dict(self.options)
        if not self.seed_given:
            options.pop("seed")
        canonical = {
            "content": hashlib.sha256(self.content[0]).hexdigest(),
            "styles": [hashlib.sha256(data).hexdigest() for data, _, _ in self.styles],
            "style_weights": self.style_weights,
            "options": options,
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _parse_value(name: str, raw: str) -> Any:
    """One form value, typed after ``stylize``'s annotation of ``name``."""
    hint = typing.get_type_hints(stylize)[name]
    args = typing.get_args(hint)
    text = raw.strip()
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if hint in (int, int | None):
            return None if text in ("", "auto") and hint is not int else int(text)
        if hint is float:
            return float(text)
        if hint == float | None:
            return None if text in ("", "auto") else float(text)
        if name in ("content_layers", "style_layers"):
            return [part.strip() for part in text.split(",") if part.strip()]
        if float in args or name == "style_layer_weights":
            return None if text == "" else [float(part) for part in text.split(",")]
        return text
    except ValueError:
        raise OptionError(f"cannot read {raw!r} as {hint}", field=name) from None


def parse_options(form: Mapping[str, str]) -> dict[str, Any]:
    """The engine options in ``form`` over ``stylize``'s defaults (not yet validated)."""
    values = {name: value for name, value in defaults().items() if name in JOB_OPTIONS}
    for name in JOB_OPTIONS:
        raw = form.get(name)
        if raw is not None and (raw.strip() != "" or name in ("seed", "scales")):
            values[name] = _parse_value(name, raw)
    return values


def parse_request(
    form: Mapping[str, Sequence[str]],
    uploads: Sequence[Upload],
    settings: Settings,
    runnable_backbones: set[str] | None = None,
    decode_slots: AbstractContextManager[Any] | None = None,
) -> JobRequest:
    """Validate a submission: fields, options, images. Raises a :class:`StylequeueError`.

    ``runnable_backbones``: the backbones live workers can run (None: not known, e.g. no
    worker is up yet); a job asking for another one is refused rather than left to fail.
    ``decode_slots`` bounds the process's concurrent verification decodes
    (:func:`shared.images.probe_image`): no decoded image is kept.
    """
    unknown = sorted(set(form) - FORM_FIELDS)
    if unknown:
        raise OptionError(f"unknown field {unknown[0]!r}", field=unknown[0])
    single = {name: values[-1] for name, values in form.items() if values}
    options = parse_options(single)
    if options["init"] not in INIT_CHOICES:
        raise OptionError(f"must be one of {', '.join(INIT_CHOICES)}", field="init")

    if runnable_backbones is not None and options["backbone"] not in runnable_backbones:
        raise OptionError(
            f"no worker can run {options['backbone']!r} (its weights are missing there); "
            f"available: {', '.join(sorted(runnable_backbones))}",
            field="backbone",
        )
    style_count = len([u for u in uploads if u.field == "style"]) + sum(
        len([n for n in value.split(",") if n]) for value in form.get("style_preset", [])
    )
    if style_count > settings.max_styles:
        raise OptionError(
            f"{style_count} styles; at most {settings.max_styles} per job", field="style"
        )
    limits = {
        "max_bytes": settings.max_image_bytes,
        "max_pixels": settings.max_image_pixels,
        "decode_slots": decode_slots,
    }
    contents = [u for u in uploads if u.field == "content"]
    if len(contents) != 1:
        raise OptionError("exactly one content image is needed", field="content")
    for upload in uploads:
        if upload.field not in ("content", "style"):
            raise OptionError(f"unexpected file field {upload.field!r}", field=upload.field)
    content = probe_image(contents[0].data, name="content", **limits)

    styles: list[tuple[bytes, ImageInfo, str | None]] = []
    for upload in uploads:
        if upload.field == "style":
            styles.append((*probe_image(upload.data, name="style", **limits), None))
    available = presets()
    for name in (n for value in form.get("style_preset", []) for n in value.split(",") if n):
        if name not in available:
            raise OptionError(
                f"no preset {name!r}; choose one of {', '.join(available)}", field="style_preset"
            )
        styles.append((*probe_image(available[name].path, name="style_preset", **limits), name))
    if not styles:
        raise OptionError("give a style image or a style_preset", field="style")

    weights_text = single.get("style_weights", "").strip()
    try:
        style_weights = [float(w) for w in weights_text.split(",")] if weights_text else None
    except ValueError:
        raise OptionError(
            f"cannot read {weights_text!r} as numbers", field="style_weights"
        ) from None
    checked = check_options(
        styles=len(styles),
        style_weights=style_weights,
        preview_every=0,
        checkpoint_every=0,
        max_size=settings.max_size,
        **{k: v for k, v in options.items() if k != "original_colors"},
    )
    if checked["iterations"] > settings.max_iterations:
        raise OptionError(
            f"must be at most {settings.max_iterations} on this service", field="iterations"
        )
    # The coarsest pyramid scale must still reach the deepest layer (depends on the aspect).
    check_image_sizes(content[1].size, [info.size for _, info, _ in styles], checked)
    checked["original_colors"] = bool(options["original_colors"])
    seed_given = checked["seed"] is not None
    if checked["seed"] is None:
        # Drawn now, so the job records it: rerunning its params reproduces the image.
        checked["seed"] = secrets.randbelow(2**31)
    for name in ("preview_every", "checkpoint_every"):
        checked.pop(name)
    reuse = single.get("reuse", "true").strip().lower()
    if reuse not in ("true", "false", "1", "0", "yes", "no"):
        raise OptionError("must be true or false", field="reuse")
    callback_url = single.get("callback_url", "").strip() or None
    if callback_url is not None:
        callback_url = check_callback_url(callback_url, settings)
    return JobRequest(
        content=content,
        styles=styles,
        options=checked,
        style_weights=checked.pop("style_weights"),
        seed_given=seed_given,
        reuse=reuse in ("true", "1", "yes"),
        callback_url=callback_url,
    )


def store_image(session: Session, storage: Storage, data: bytes, image: ImageInfo) -> str:
    """Store ``data`` once under its SHA-256; returns the hash.

    Safe when two requests bring the same new image at once: the file write is atomic and
    idempotent, and the row is inserted with ON CONFLICT DO NOTHING.
    """
    digest = hashlib.sha256(data).hexdigest()
    key = f"images/{digest[:2]}/{digest}"
    if not storage.exists(key):
        storage.put(key, data)
    dialect = session.get_bind().dialect.name
    insert_image = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}[dialect]
    session.execute(
        insert_image(StoredImage)
        .values(
            sha256=digest,
            storage_key=key,
            width=image.width,
            height=image.height,
            size_bytes=len(data),
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["sha256"])
    )
    return digest


def create_job(session: Session, storage: Storage, request: JobRequest) -> Job:
    """Store the images and add the job row (queued); the caller commits and enqueues."""
    content_sha = store_image(session, storage, *request.content)
    job = Job(
        id=uuid.uuid4(),
        status=JobStatus.QUEUED,
        params=request.options,
        content_sha256=content_sha,
        total=request.options["iterations"],
        iteration=0,
        attempts=0,
        cancel_requested=False,
        callback_url=request.callback_url,
        callback_next_at=utcnow() if request.callback_url else None,
    )
    for position, ((data, image, preset), weight) in enumerate(
        zip(request.styles, request.style_weights, strict=True)
    ):
        job.styles.append(
            JobStyle(
                position=position,
                image_sha256=store_image(session, storage, data, image),
                weight=weight,
                preset=preset,
            )
        )
    session.add(job)
    session.flush()
    return job


# Built once (SQLAlchemy compiles it once and caches that): building the ORM expression
# anew took about half of a queued job's status poll (cProfile, in-process).
QUEUED_BEFORE = (
    select(func.count())
    .select_from(Job.__table__)
    .where(
        Job.__table__.c.status == JobStatus.QUEUED.value,
        Job.__table__.c.created_at < bindparam("created_at"),
    )
)


def queue_position(db: Session | Connection, created_at: datetime) -> int:
    """The position of a queued job created at ``created_at``: 1 for the next to start.
    ``db`` is a Session or, for the status poll, the Core connection that read the job."""
    return int(db.scalar(QUEUED_BEFORE, {"created_at": created_at}) or 0) + 1
