"""Job requests: parse and validate a submission, store its images, create its row.

Used by the API and the web form alike. Validation happens before anything is written: a
rejected request leaves no row and no file behind.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.backbones import default_backbone
from shared.config import Settings
from shared.db import insert_ignoring_duplicates
from shared.errors import ImageTooLarge, OptionError
from shared.estimate import job_work
from shared.fields import form_text, form_values, validate
from shared.images import ImageInfo, probe_image
from shared.models import Job, JobKind, JobMode, JobStatus, JobStyle, StoredImage, utcnow
from shared.normalize import check_image_sizes, check_options, normalize_weights, style_side
from shared.options import (
    FAST_MAX_SIZE,
    FILE_FIELDS,
    INIT_FAST,
    OPTION_NAMES,
    SUBMISSION_FIELDS,
    RunOptions,
    Submission,
)
from shared.parts import FrameRun, VideoMedia, cut, probe_contents, run_iterations, run_work
from shared.presets import presets
from shared.pyramid import MIN_SIZE, lbfgs_history_for, pyramid, scaled_pixels
from shared.routing import job_memory_bytes
from shared.storage import Storage
from shared.video import VideoInfo
from shared.webhooks import check_callback_url


@dataclass
class Upload:
    field: str
    filename: str
    data: bytes


@dataclass
class JobRequest:
    """A validated submission: the images (bytes, and what their headers say) and the
    normalized options."""

    #: The photo, or the first photo of a batch, or the video (its header's frame size).
    content: tuple[bytes, ImageInfo]
    styles: list[tuple[bytes, ImageInfo, str | None]]  # bytes, header, preset name
    options: RunOptions
    style_weights: list[float] = field(default_factory=list)
    #: The seed was given by the client (not drawn): the result is reproducible.
    seed_given: bool = False
    #: False when the client opted out of result reuse (``reuse=false``).
    reuse: bool = True
    #: Where to POST the signed notice when the job finishes (an allowed host).
    callback_url: str | None = None
    mode: JobMode = JobMode.OPTIMIZE
    #: A batch's photos after the first (``content``).
    more_contents: list[tuple[bytes, ImageInfo]] = field(default_factory=list)
    #: A video job's header, and the runs its frames are cut into.
    video: VideoInfo | None = None
    runs: list[FrameRun] = field(default_factory=list)

    @property
    def kind(self) -> JobKind:
        if self.video is not None:
            return JobKind.VIDEO
        return JobKind.BATCH if self.more_contents else JobKind.PICTURE

    @property
    def contents(self) -> list[tuple[bytes, ImageInfo]]:
        return [self.content, *self.more_contents]

    def plan(self) -> list[tuple[int, int]]:
        """The pyramid: (long side, iterations) per scale, coarsest first."""
        options = self.options
        return pyramid(options.size, options.scales, options.iterations)

    def work(self) -> int:
        """The job's work for the ETA (shared/estimate.py); 0 for a fast job."""
        if self.mode == JobMode.FAST:
            return 0
        if self.video is not None:
            return sum(self.part_work(run) for run in self.runs)
        return sum(job_work(self.plan(), *info.size) for _, info in self.contents)

    def part_work(self, run: FrameRun) -> int:
        return run_work(self.options, self.content[1].size, run.count)

    def memory_bytes(self) -> int:
        """An upper estimate of the memory the job needs where it runs (shared/routing.py),
        its styles at the finest scale included."""
        # The finest scale's long side: the output's (pyramid() ends there).
        finest = self.plan()[-1][0]
        style_pixels = []
        for _, info, _ in self.styles:
            side = style_side(info.size, finest, self.options)
            style_pixels.append(scaled_pixels(*info.size, side))
        output_pixels = max(scaled_pixels(*info.size, finest) for _, info in self.contents)
        return job_memory_bytes(
            output_pixels=output_pixels,
            optimizer=self.options.optimizer,
            lbfgs_history=lbfgs_history_for(output_pixels, self.options.lbfgs_history),
            style_pixels=style_pixels,
            input_pixels=max(info.width * info.height for _, info in self.contents)
            + sum(info.width * info.height for _, info, _ in self.styles),
        )

    def _more_digests(self) -> dict[str, list[str]]:
        if not self.more_contents:  # a one-picture job's fingerprint stays as it was
            return {}
        return {"more": [hashlib.sha256(data).hexdigest() for data, _ in self.more_contents]}

    def fingerprint(self) -> str:
        """SHA-256 of what determines the result: input bytes, weights and options.

        A drawn seed is left out, so that resending a request is recognised as the same.
        """
        options = self.options.stored()
        if not self.seed_given:
            options.pop("seed")
        canonical = {
            "content": hashlib.sha256(self.content[0]).hexdigest(),
            **self._more_digests(),
            "styles": [hashlib.sha256(data).hexdigest() for data, _, _ in self.styles],
            "style_weights": self.style_weights,
            "options": options,
            "mode": self.mode.value,
        }
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def parse_request(
    form: Mapping[str, Sequence[str]],
    uploads: Sequence[Upload],
    settings: Settings,
    runnable_backbones: Collection[str] | None = None,
    decode_slots: AbstractContextManager[Any] | None = None,
) -> JobRequest:
    """Validate a submission: fields, options, images. Raises a :class:`StylequeueError`.

    ``runnable_backbones``: the backbones live workers can run (None: not known, e.g. no
    worker is up yet); a job asking for another one is refused rather than left to fail.
    ``decode_slots`` bounds the process's concurrent verification decodes
    (:func:`shared.images.probe_image`): no decoded image is kept.
    """
    unknown = sorted(set(form) - {*SUBMISSION_FIELDS, *FILE_FIELDS})
    if unknown:
        raise OptionError(f"unknown field {unknown[0]!r}", field=unknown[0])
    fields = {name: values for name, values in form.items() if name in SUBMISSION_FIELDS}
    submission = validate(
        Submission, form_values(fields), limits={"size": (MIN_SIZE, settings.max_size)}
    )
    options = {name: getattr(submission, name) for name in OPTION_NAMES}
    mode = JobMode(submission.mode)
    if mode == JobMode.FAST and options["size"] > FAST_MAX_SIZE:
        raise OptionError(
            f"a fast job's picture is at most {FAST_MAX_SIZE} px (the network runs at 384 px); "
            "use mode=optimize for larger ones",
            field="size",
        )

    if "backbone" not in fields:
        # As the form does: where no worker has the default's weights, a job that names no
        # backbone takes the best one they have instead of failing or being refused.
        options["backbone"] = default_backbone(runnable_backbones, offline=settings.offline)
    if runnable_backbones is not None and options["backbone"] not in runnable_backbones:
        raise OptionError(
            f"no worker can run {options['backbone']!r} (its weights are missing there); "
            f"available: {', '.join(sorted(runnable_backbones))}",
            field="backbone",
        )
    style_count = len([u for u in uploads if u.field == "style"]) + len(submission.style_preset)
    if style_count > settings.max_styles:
        raise OptionError(
            f"{style_count} styles; at most {settings.max_styles} per job", field="style"
        )
    limits = {
        "max_bytes": settings.max_image_bytes,
        "max_pixels": settings.max_image_pixels,
        "decode_slots": decode_slots,
    }
    for upload in uploads:
        if upload.field not in ("content", "style"):
            raise OptionError(f"unexpected file field {upload.field!r}", field=upload.field)
    contents = probe_contents([u.data for u in uploads if u.field == "content"], settings, limits)
    content, video = contents[0], None
    if isinstance(content[1], VideoInfo):
        video = content[1]
        content = (content[0], ImageInfo(video.width, video.height, video.container))
        if mode == JobMode.FAST or options["init"] == INIT_FAST:
            raise OptionError(
                "a video job optimizes each frame from the one before; its feed-forward video "
                "is its first preview (use mode=optimize and init=content)",
                field="mode" if mode == JobMode.FAST else "init",
            )

    styles: list[tuple[bytes, ImageInfo, str | None]] = []
    for upload in uploads:
        if upload.field == "style":
            styles.append((*probe_image(upload.data, name="style", **limits), None))
    available = presets()
    for name in submission.style_preset:
        if name not in available:
            raise OptionError(
                f"no preset {name!r}; choose one of {', '.join(available)}", field="style_preset"
            )
        styles.append((*probe_image(available[name].path, name="style_preset", **limits), name))
    if not styles:
        raise OptionError("give a style image or a style_preset", field="style")

    checked = check_options(**options, styles=len(styles), max_size=settings.max_size)
    style_weights = normalize_weights(submission.style_weights, len(styles), "style_weights")
    if checked.iterations > settings.max_iterations:
        raise OptionError(
            f"must be at most {settings.max_iterations} on this service", field="iterations"
        )
    # The coarsest pyramid scale must still reach the deepest layer (depends on the aspect).
    check_image_sizes(content[1].size, checked)
    seed_given = checked.seed is not None
    if not seed_given:
        # Drawn now, so the job records it: rerunning its params reproduces the image.
        checked = checked.model_copy(update={"seed": secrets.randbelow(2**31)})
    callback_url = submission.callback_url
    if callback_url is not None:
        callback_url = check_callback_url(callback_url.strip(), settings)
    more = [item for item in contents[1:] if isinstance(item[1], ImageInfo)]
    for _, info in more:
        check_image_sizes(info.size, checked)
    if more and mode == JobMode.FAST:
        raise OptionError("a fast job is one picture; batches use mode=optimize", field="mode")
    runs = cut(video.frames, settings.video_run_frames, settings.video_seam_frames) if video else []
    request = JobRequest(
        content=content,
        styles=styles,
        options=checked,
        style_weights=style_weights,
        seed_given=seed_given,
        # A result of many parts is put together from its parts: never reused.
        reuse=submission.reuse and not more and video is None,
        callback_url=callback_url,
        mode=mode,
        more_contents=more,
        video=video,
        runs=runs,
    )
    work = request.work()
    if request.kind.has_parts and work > settings.max_job_work:
        raise ImageTooLarge(
            f"the job's work (output pixels × iterations over all its pictures) is "
            f"{work:.3g}; the limit is {settings.max_job_work:.3g}: fewer frames or "
            "photos, a smaller size or fewer iterations",
            field="content",
        )
    return request


#: What "run again" may change: the options, not the images.
AGAIN_FIELDS = frozenset({*OPTION_NAMES, "mode"})


def request_again(
    job: Job, storage: Storage, changes: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], list[Upload]]:
    """The submission that runs ``job`` again with ``changes`` to its options: its images
    (read back from storage), its options and seed, its style weights. A new strength
    recomputes the style weight from it; a new size, the number of scales."""
    if job.job_kind != JobKind.PICTURE or job.parent_id is not None:
        raise OptionError("only a one-picture job runs again; submit a batch or video anew")
    unknown = sorted(set(changes) - AGAIN_FIELDS)
    if unknown:
        raise OptionError("only the options can change, not the images", field=unknown[0])
    form = {name: [form_text(job.params.get(name))] for name in OPTION_NAMES}
    form["mode"] = [job.mode]
    form["style_weights"] = [form_text([style.weight for style in job.styles])]
    if "style_strength" in changes and "style_weight" not in changes:
        form["style_weight"] = [""]
    if "size" in changes and "scales" not in changes:
        form["scales"] = [""]
    form |= {name: list(values) for name, values in changes.items()}
    stored = {image.sha256: image for image in _stored_images(job)}
    uploads = [Upload("content", "content", storage.get(stored[job.content_sha256].storage_key))]
    if all(style.preset for style in job.styles):  # presets stay presets, in their order
        form["style_preset"] = [",".join(str(style.preset) for style in job.styles)]
    else:
        for style in job.styles:
            key = stored[style.image_sha256].storage_key
            uploads.append(Upload("style", f"style-{style.position}", storage.get(key)))
    return form, uploads


def _stored_images(job: Job) -> list[StoredImage]:
    session = Session.object_session(job)
    assert session is not None, "a job loaded from the database"
    digests = {job.content_sha256, *(style.image_sha256 for style in job.styles)}
    return list(session.scalars(select(StoredImage).where(StoredImage.sha256.in_(digests))))


def store_image(session: Session, storage: Storage, data: bytes, image: ImageInfo) -> str:
    """Store ``data`` once under its SHA-256; returns the hash.

    Safe when two requests bring the same new image at once: the file write is atomic and
    idempotent, and the row is inserted with ON CONFLICT DO NOTHING.
    """
    digest = hashlib.sha256(data).hexdigest()
    key = f"images/{digest[:2]}/{digest}"
    if not storage.exists(key):
        storage.put(key, data)
    session.execute(
        insert_ignoring_duplicates(session, StoredImage).values(
            sha256=digest,
            storage_key=key,
            width=image.width,
            height=image.height,
            size_bytes=len(data),
            created_at=utcnow(),
        )
    )
    return digest


def create_job(session: Session, storage: Storage, request: JobRequest) -> Job:
    """Store the images and add the job row (queued), and for a batch or a video its parts
    (:func:`_new_parts`); the caller commits and enqueues."""
    content_sha = store_image(session, storage, *request.content)
    style_shas = [store_image(session, storage, data, image) for data, image, _ in request.styles]
    job = _new_job(request, content_sha, style_shas, request.work())
    job.kind = request.kind.value
    if request.kind == JobKind.PICTURE:
        job.total = 0 if request.mode == JobMode.FAST else request.options.iterations
    else:
        parts = _new_parts(session, storage, request, content_sha, style_shas)
        job.total = sum(part.total for part in parts)
        job.media = asdict(VideoMedia.of_info(request.video)) if request.video else None
        for part in parts:
            part.parent_id = job.id
    session.add(job)
    session.flush()
    if request.kind != JobKind.PICTURE:
        session.add_all(parts)
        session.flush()
    return job


def _new_job(request: JobRequest, content_sha: str, style_shas: list[str], work: int) -> Job:
    job = Job(
        id=uuid.uuid4(),
        status=JobStatus.QUEUED,
        mode=request.mode.value,
        params=request.options.stored(),
        content_sha256=content_sha,
        total=request.options.iterations,
        work=work,
        iteration=0,
        attempts=0,
        cancel_requested=False,
        callback_url=request.callback_url,
        callback_next_at=utcnow() if request.callback_url else None,
    )
    for position, ((_, _, preset), digest, weight) in enumerate(
        zip(request.styles, style_shas, request.style_weights, strict=True)
    ):
        job.styles.append(
            JobStyle(position=position, image_sha256=digest, weight=weight, preset=preset)
        )
    return job


def _new_parts(
    session: Session, storage: Storage, request: JobRequest, content_sha: str,
    style_shas: list[str],
) -> list[Job]:  # fmt: skip
    """A batch's pictures, or a video's runs of frames: jobs of their own, without a
    callback (the parent's is sent)."""
    parts = []
    if request.video is not None:
        for run in request.runs:
            part = _new_job(request, content_sha, style_shas, request.part_work(run))
            part.kind, part.frames = JobKind.FRAMES.value, run.stored()
            part.total = run_iterations(request.options, run.count)
            parts.append(part)
    else:
        for data, info in request.contents:
            digest = content_sha if not parts else store_image(session, storage, data, info)
            part = _new_job(request, digest, style_shas, job_work(request.plan(), *info.size))
            part.kind = JobKind.PICTURE.value
            parts.append(part)
    for index, part in enumerate(parts):
        part.part_index = index
        part.callback_url, part.callback_next_at = None, None
    return parts


def scale_plan(params: Mapping[str, Any]) -> list[dict[str, int]]:
    """A job's pyramid as its page marks it: each scale's long side, iterations and first
    iteration (1-based, counted over all scales); none for params without a pyramid
    (rows written before it existed)."""
    plan: list[dict[str, int]] = []
    start = 1
    if any(params.get(name) is None for name in ("size", "scales", "iterations")):
        return plan
    for side, iterations in pyramid(params["size"], params["scales"], params["iterations"]):
        plan.append({"size": side, "iterations": iterations, "start": start})
        start += iterations
    return plan
