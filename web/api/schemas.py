"""The shapes of the API's answers, as pydantic models: the OpenAPI document's component
schemas are generated from them, and the tests validate real responses against those.

The views build their JSON as dicts (web/api/serialize.py): a status poll is the hottest
path of the service, and building a model there would only check again what the tests
check once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from shared.models import PREVIEW_FEEDFORWARD, PREVIEW_OPTIMIZER, JobStatus
from shared.options import ModeName, Options

StatusName = Literal[tuple(status.value for status in JobStatus)]  # type: ignore[valid-type]
Moment = str | None  # ISO 8601 with its zone, UTC


class Shape(BaseModel):
    """An answer's object: exactly these fields (the document says additionalProperties
    false, so a field the code adds and the document lacks fails the tests)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Shape):
    code: str = Field(description="stable, machine-readable")
    message: str
    field: str | None = Field(description="the input at fault, if one is")


class Error(Shape):
    error: ErrorDetail


def _params_model() -> type[BaseModel]:
    """A job's ``params``: the options as the service normalized them (``style_strength``
    null when ``style_weight`` was given) and the styles' weights. A job submitted before an
    option existed lacks it."""
    fields: dict[str, Any] = {
        name: (info.annotation | None, Field(None, description=info.description))
        for name, info in Options.model_fields.items()
    }
    fields["style_weights"] = (list[float], Field(description="the styles' blend, summing to 1"))
    return create_model("JobParams", __config__=ConfigDict(extra="forbid"), **fields)


JobParams = _params_model()


class JobStyleOut(Shape):
    image: str = Field(description="SHA-256 of the style image")
    weight: float
    preset: str | None


class Progress(Shape):
    iteration: int = Field(ge=0)
    total: int = Field(ge=0, description="0 for a fast job: it makes no iteration")


class Scale(Shape):
    size: int = Field(description="long side, px")
    iterations: int
    start: int = Field(description="its first iteration, 1-based over all scales")


class Preview(Shape):
    url: str
    source: Literal[PREVIEW_FEEDFORWARD, PREVIEW_OPTIMIZER]  # type: ignore[valid-type]
    iteration: int | None = Field(description="0: the feed-forward picture, before any")


class Loss(Shape):
    total: float
    content: float | None
    style: float | None
    tv: float | None


class JobRunOut(Shape):
    attempt: int
    host: str | None
    worker: str | None
    device: str | None
    queue: str | None
    resumed_from_iteration: int | None
    started_at: Moment
    ended_at: Moment
    outcome: str | None = Field(description="null while it runs")


class JobLinks(Shape):
    self: str
    page: str
    result: str
    preview: str
    losses: str
    events: str
    cancel: str
    again: str
    content: str
    styles: list[str]


class JobError(Shape):
    code: str | None
    message: str | None


class Callback(Shape):
    url: str
    attempts: int
    delivered_at: Moment
    next_attempt_at: Moment
    error: str | None


class FramesOut(Shape):
    first: int = Field(description="the first frame the run makes (0-based)")
    start: int = Field(description="the first frame it owns; those before it, a seam")
    stop: int = Field(description="the frame after its last")


class PartOut(Shape):
    id: str
    index: int
    status: StatusName
    iteration: int
    total: int
    loss: float | None
    url: str = Field(description="the part's own job: its status, losses, preview")
    frames: FramesOut | None = Field(None, description="a video's run of frames")


class Parts(Shape):
    total: int
    done: int = Field(description="parts succeeded")
    items: list[PartOut]


class ParentOut(Shape):
    id: str = Field(description="the batch or video this job is a part of")
    index: int | None


class VideoOut(Shape):
    width: int
    height: int
    frames: int
    fps: str = Field(description="a fraction: 30000/1001")
    audio: bool


class Job(Shape):
    id: str = Field(description="UUID")
    status: StatusName
    mode: ModeName
    kind: Literal["picture", "batch", "video", "frames"] = Field(
        description="one picture; a batch or video (with parts); a video's run of frames"
    )
    params: JobParams  # type: ignore[valid-type]
    styles: list[JobStyleOut]
    created_at: Moment
    started_at: Moment
    finished_at: Moment
    progress: Progress
    eta_seconds: float | None = Field(description="until it finishes, queue included")
    wait_seconds: float | None = Field(description="until it starts")
    scales: list[Scale]
    preview: Preview | None
    loss: Loss | None = Field(description="the latest iteration's, weighted")
    attempts: int
    resumed_from_iteration: int | None
    reused_from: str | None = Field(description="the job whose result this one reuses")
    expired_at: Moment
    worker: str | None
    device: str | None
    queue: str | None
    runs: list[JobRunOut]
    cancel_requested: bool
    links: JobLinks
    queue_position: int | None = Field(
        None, ge=1, description="while queued: 1 for the next to start"
    )
    error: JobError | None = Field(None, description="when it failed")
    callback: Callback | None = Field(None, description="when it has a callback_url")
    parts: Parts | None = Field(None, description="a batch's or video's parts")
    parent: ParentOut | None = Field(None, description="a part's batch or video")
    frames: FramesOut | None = Field(None, description="a video's run of frames")
    video: VideoOut | None = Field(None, description="a video job's source")


class JobPage(Shape):
    jobs: list[Job]
    next_cursor: str | None


class LossPointOut(Shape):
    iteration: int
    total: float
    content: float
    style: float
    tv: float
    temporal: float = Field(description="a video frame's temporal loss; 0 for a photo")
    elapsed: float | None


class LossPoints(Shape):
    job: str
    points: list[LossPointOut]


class Estimate(Shape):
    run_seconds: float | None
    wait_seconds: float | None
    total_seconds: float | None
    workers: int
    basis: Literal["measured", "none"]
    message: str


class PresetOut(Shape):
    name: str
    title: str
    artist: str
    year: int
    attribution: str
    url: str


class Presets(Shape):
    presets: list[PresetOut]


class Workers(Shape):
    workers: list[dict[str, Any]] = Field(description="heartbeats (the running job: admins)")
    backbones: list[str]


class WebhookSecret(Shape):
    secret: str
    algorithm: Literal["HMAC-SHA256"]


class Health(Shape):
    status: Literal["ok"]


class Ready(Shape):
    status: Literal["ready", "not ready"]
    database: Literal["ok", "error"]
    redis: Literal["ok", "error"]
    workers: int
    capacity: list[dict[str, Any]]


#: Every model the document names, by its name there.
COMPONENTS: tuple[type[BaseModel], ...] = (
    Error, Job, JobPage, LossPoints, Estimate, Presets, Workers, WebhookSecret, Health, Ready,
)  # fmt: skip
