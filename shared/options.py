"""The job options, defined once: name, type, default, range or choices, unit and help.

Torch-free, in the layer both the web and the worker import. Everything that speaks of an
option is generated from :class:`Options`: the engine's checks
(:func:`shared.normalize.check_options`), the defaults of :func:`worker.engine.stylize`, the
command line's flags and help, the API's parsing and its 422 errors (shared/fields.py), the
form's fields and the OpenAPI document (pydantic's JSON Schema). :class:`RunOptions` is what
a run's options become once checked: a job's ``params``, the engine's options and a
checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from shared.backbones import BACKBONES, DEFAULT_BACKBONE
from shared.config import parse_bool
from shared.pyramid import MAX_LBFGS_HISTORY, MAX_SCALES, MIN_SIZE

#: Limits of the options; the service narrows ``size`` and ``iterations`` with its settings.
MAX_SIZE = 4096
MAX_ITERATIONS = 100_000
#: The default strength of the style and the range of β it spans, as powers of ten: with
#: relative losses (losses.relative_scale) and the default content layers, β = 0.1 leaves
#: a photo untouched and 100 paints it boldly over its layout (bench/contact_sheet.py,
#: docs/strength-sweep.png).
DEFAULT_STYLE_STRENGTH = 0.6
STYLE_WEIGHT_LOG10_RANGE = (-1.0, 2.0)
#: Bounds of the feed-forward picture's long side (worker/feedforward.py): its network runs
#: at 384 px; above 1024 an upscaled picture only gets blurrier and bigger, below 32 nothing
#: is visible.
FAST_MIN_SIZE = 32
FAST_MAX_SIZE = 1024
#: The content layers: Gatys et al.'s relu4_2 keeps the objects but leaves flat, blurred
#: regions (a photo's background) to the style, which repaints their light and dark with the
#: painting's; relu3_1 beside it keeps their layout (bench/tune.py, docs/engine.md).
DEFAULT_CONTENT_LAYERS = ("relu3_1", "relu4_2")
#: The temporal loss's weight for video (Ruder et al. 2016): relative to the warped frame's
#: mean square, as the content loss is (bench/video.py measures flicker against it).
DEFAULT_TEMPORAL_WEIGHT = 100.0
#: The largest weight any option takes: far past any useful one, well inside fp32.
MAX_WEIGHT = 1e12

InitName = Literal["content", "noise", "style", "fast"]
StyleLossName = Literal["gram", "wasserstein"]
OptimizerName = Literal["lbfgs", "adam"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PoolingName = Literal["max", "avg"]
ModeName = Literal["optimize", "fast"]
BackboneName = Literal[tuple(BACKBONES)]  # type: ignore[valid-type]

INIT_CHOICES: tuple[str, ...] = get_args(InitName)
#: ``init=fast`` starts from the feed-forward picture, which the worker (or the command
#: line) makes and hands to the engine as an image; the engine itself never makes it.
INIT_FAST = "fast"
DEFAULT_INIT = "content"
MODE_CHOICES: tuple[str, ...] = get_args(ModeName)


def _split(value: Any) -> Any:
    """A form's list: repeated fields, each possibly comma-separated (``relu1_1,relu2_1``).
    A bare string is not a list (its letters would be read as names)."""
    if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
        return tuple(item.strip() for part in value for item in part.split(",") if item.strip())
    return value


def _auto(value: Any) -> Any:
    """An optional number left to the engine: empty, ``auto`` or null."""
    if isinstance(value, str) and value.strip().lower() in ("", "auto"):
        return None
    return value


def _boolean(value: Any) -> Any:
    """The one boolean parser of the project (shared.config.parse_bool) for text."""
    return parse_bool(value) if isinstance(value, str) else value


Names = Annotated[tuple[str, ...], Field(min_length=1), BeforeValidator(_split)]
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT)]
Weights = Annotated[tuple[Weight, ...] | None, BeforeValidator(_auto), BeforeValidator(_split)]
Flag = Annotated[bool, BeforeValidator(_boolean)]


def _option(
    default: Any, help: str, unit: str | None = None, title: str | None = None, **limits: Any
) -> Any:
    """One option's field: its default, one-line help, unit, label (``title``: the form's;
    else the name's words) and limits."""
    extra = {"x-unit": unit} if unit else None
    return Field(default, description=help, title=title, json_schema_extra=extra, **limits)


class Options(BaseModel):
    """The options of a style transfer: what a job, the command line and ``stylize`` take.

    The fields' order is the order the form, the command line's help and the OpenAPI
    document list them in.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    size: int = _option(512, "long side of the output", "px", ge=MIN_SIZE, le=MAX_SIZE)
    iterations: int = _option(
        300, "optimizer steps in all, one loss evaluation each", ge=1, le=MAX_ITERATIONS
    )
    style_strength: float = _option(
        DEFAULT_STYLE_STRENGTH,
        "how strongly the painting shows: 0 leaves the photo as it is, 1 paints it boldly "
        "over its layout; sets style_weight on a log scale, 0.1 to 100",
        ge=0.0,
        le=1.0,
    )
    scales: Annotated[int | None, BeforeValidator(_auto)] = _option(
        None,
        "coarse-to-fine scales, each twice the previous one's size, the iterations split "
        "evenly; unset: halve while the coarsest stays at least 128 px",
        ge=1,
        le=MAX_SCALES,
    )
    style_scale: float = _option(
        1.0, "long side of each style image relative to the output's", "×", ge=0.05, le=4.0
    )
    content_weight: float = _option(
        1.0, "α, the weight of the content loss", title="Content weight (α)", ge=0, le=MAX_WEIGHT
    )
    style_weight: Annotated[float | None, BeforeValidator(_auto)] = _option(
        None, "β, the weight of the style loss; unset: from style_strength",
        title="Style weight (β)", ge=0, le=MAX_WEIGHT,
    )  # fmt: skip
    tv_weight: float = _option(
        3.0, "γ, the weight of the total-variation loss (smoothness)", title="TV weight (γ)",
        ge=0, le=MAX_WEIGHT,
    )  # fmt: skip
    temporal_weight: float = _option(
        DEFAULT_TEMPORAL_WEIGHT,
        "video only: how strongly each frame keeps the previous one's strokes where the "
        "motion can be followed (Ruder et al.'s temporal loss); 0: none, each frame still "
        "starting from the previous one, warped",
        ge=0, le=MAX_WEIGHT,
    )  # fmt: skip
    content_layers: Names = _option(
        DEFAULT_CONTENT_LAYERS,
        "backbone layers whose features match the photo's (comma-separated); the paper "
        "uses relu4_2 alone",
    )
    style_layers: Names = _option(
        ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
        "backbone layers whose Gram matrices match the styles' (comma-separated)",
    )
    style_layer_weights: Weights = _option(
        None,
        "weight per style layer (comma-separated); unset: each half the one before, summing "
        "to 1 (16:8:4:2:1 for five); the paper weighs them equally",
    )
    style_loss: StyleLossName = _option(
        "gram",
        "gram: Gram matrices, as in the paper; wasserstein: the Wasserstein-2 distance of "
        "the features' means and covariances (crowsonkb's style-transfer-pytorch)",
    )
    init: InitName = _option(
        DEFAULT_INIT,
        "where the optimization starts: the photo, uniform noise from the seed, the first "
        "style, or fast: the feed-forward picture",
        title="Start from",
    )
    optimizer: OptimizerName = _option("lbfgs", "lbfgs (unit steps) or adam")
    lr: float = _option(
        0.02, "Adam's learning rate, in pixel units", title="Learning rate (Adam)", ge=1e-6,
        le=10.0,
    )  # fmt: skip
    lbfgs_history: Annotated[int | None, BeforeValidator(_auto)] = _option(
        None,
        "curvature pairs L-BFGS keeps (24 bytes a pixel each); unset: 100, fewer where that "
        "would pass 2 GiB",
        title="L-BFGS history",
        ge=1,
        le=MAX_LBFGS_HISTORY,
    )
    backbone: BackboneName = _option(DEFAULT_BACKBONE, "the network whose features are matched")
    pooling: PoolingName = _option("max", "max as in VGG, or avg (smoother, per Gatys et al.)")
    original_colors: Flag = _option(
        False,
        "keep the photo's colours, transferring only luminance",
        title="Keep the photo's colours",
    )
    seed: Annotated[int | None, BeforeValidator(_auto)] = _option(
        None, "makes a run reproducible; unset: drawn, and recorded in the job", ge=0,
        le=2**63 - 1,
    )  # fmt: skip
    precision: PrecisionName = _option(
        "auto", "auto: bf16 where the hardware does it fast, else fp32; grams stay fp32"
    )


class Submission(Options):
    """A job's form fields besides the images (``content``, ``style``): the options and
    what the service adds to them."""

    mode: ModeName = _option(
        "optimize",
        "optimize: Gatys et al.'s optimization; fast: the feed-forward picture only, in "
        "about a second",
    )
    style_preset: Annotated[tuple[str, ...], BeforeValidator(_split)] = _option(
        (), "preset paintings to use as styles (comma-separated names, see /api/presets)"
    )
    style_weights: Weights = _option(
        None, "blend weights of the styles (comma-separated), normalized; unset: equal"
    )
    reuse: Flag = _option(True, "false: never reuse an earlier identical result")
    callback_url: Annotated[str | None, BeforeValidator(_auto)] = _option(
        None, "receives a signed POST when the job finishes (allow-listed hosts only)",
        max_length=2000,
    )  # fmt: skip


OPTION_NAMES: tuple[str, ...] = tuple(Options.model_fields)
SUBMISSION_FIELDS: tuple[str, ...] = tuple(Submission.model_fields)
#: Multipart file fields of a submission.
FILE_FIELDS = ("content", "style")
DEFAULTS = Options()


def defaults() -> dict[str, Any]:
    """Every option's default."""
    return dict(DEFAULTS)


def halving_weights(count: int) -> list[float]:
    """The default style layer weights: each layer half the one before, summing to 1.

    Gatys et al. weigh the five layers equally. On real VGG16 features that lets the deep
    layers (relu4_1, relu5_1) copy whole objects of the painting into the photo, Picasso's
    eyes over a cup or a rocket; crowsonkb's 256:64:16:4:1 keeps the scene but leaves
    little of the painting's strokes. Halving keeps both (bench/tune.py, docs/engine.md).
    """
    raw = [2.0 ** (count - 1 - index) for index in range(count)]
    return [weight / sum(raw) for weight in raw]


def strength_to_weight(strength: float) -> float:
    """β for a ``style_strength`` in [0, 1]: log-linear over STYLE_WEIGHT_LOG10_RANGE, since
    what a person sees change is the ratio of the weights, not their difference."""
    low, high = STYLE_WEIGHT_LOG10_RANGE
    return 10.0 ** (low + (high - low) * strength)


class RunOptions(Options):
    """A run's options once checked (:func:`shared.normalize.check_options`), with every
    choice the defaults leave open made: the pyramid's scales, β, the style layers' weights.

    One value from the form to the checkpoint: a job's ``params`` are its JSON
    (:meth:`stored`, read back with :meth:`of_job`), the engine runs on it, and a checkpoint
    stores it with the run's inputs.
    """

    scales: int = Field(ge=1, le=MAX_SCALES)
    #: None where β was given: the strength it overrides would mean nothing.
    style_strength: float | None = Field(None, ge=0.0, le=1.0)
    style_weight: float = Field(ge=0, le=MAX_WEIGHT)
    content_layers: tuple[str, ...] = Field(min_length=1)
    style_layers: tuple[str, ...] = Field(min_length=1)
    #: None only in the params of jobs queued before the defaults were written out: such a
    #: run resumes with the weights its checkpoint holds (worker/active.py).
    style_layer_weights: tuple[Weight, ...] | None = None
    #: ``image``: the caller gives the start as an image (the engine's ``init``).
    init: InitName | Literal["image"] = DEFAULT_INIT

    @classmethod
    def of_job(cls, params: Mapping[str, Any]) -> RunOptions:
        """A job's stored ``params``: an option added since the row was written takes its
        default, as the run did then."""
        return cls.model_validate(params)

    def stored(self) -> dict[str, Any]:
        """The JSON a job's ``params`` hold."""
        return self.model_dump(mode="json")

    def engine_arguments(self) -> dict[str, Any]:
        """The options as :func:`worker.engine.stylize`'s keyword arguments."""
        return {name: getattr(self, name) for name in OPTION_NAMES}
