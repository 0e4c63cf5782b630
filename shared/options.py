"""The job options, defined once: name, type, default, range or choices, unit and help.

Torch-free, in the layer both the web and the worker import. Everything that speaks of an
option is generated from :class:`Options`: the engine's checks (:func:`check_options`), the
defaults of :func:`worker.engine.stylize`, the command line's flags and help, the API's
parsing and its 422 errors, the form's fields and the OpenAPI document (pydantic's JSON
Schema). The pyramid and size arithmetic that both sides need lives here too.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, get_args

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from shared.backbones import BACKBONES, DEFAULT_BACKBONE
from shared.config import parse_bool
from shared.errors import OptionError

#: Limits of the options; the service narrows ``size`` and ``iterations`` with its settings.
MIN_SIZE = 16
MAX_SIZE = 4096
MAX_ITERATIONS = 100_000
MAX_SCALES = 6
#: L-BFGS's curvature pairs: the default count, the most a run may ask for, and the memory
#: the default keeps them under (each pair: s and y, fp32, 3 channels: 24 B a pixel).
LBFGS_HISTORY = 100
MAX_LBFGS_HISTORY = 200
LBFGS_HISTORY_BUDGET_BYTES = 2 * 1024**3
LBFGS_PAIR_BYTES_PER_PIXEL = 24
#: The default strength of the style and the range of β it spans, as powers of ten: with
#: relative losses (losses.relative_scale) β = 0.1 leaves a photo barely touched and 100
#: keeps only its outline (bench/contact_sheet.py, docs/contact-sheet.png).
DEFAULT_STYLE_STRENGTH = 0.6
STYLE_WEIGHT_LOG10_RANGE = (-1.0, 2.0)
#: The automatic pyramid halves the size while the coarsest scale stays at least this long.
AUTO_PYRAMID_MIN_SIDE = 128
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
MODE_CHOICES: tuple[str, ...] = get_args(ModeName)
M = TypeVar("M", bound=BaseModel)


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
        "how strongly the painting shows: 0 barely touches the photo, 1 keeps only its "
        "outline; sets style_weight on a log scale, 0.1 to 100",
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
    content_layers: Names = _option(
        ("relu4_2",), "backbone layers whose features match the photo's (comma-separated)"
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
        "content",
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


@functools.cache
def field_kind(name: str, model: type[BaseModel] = Submission) -> str:
    """``bool``, ``int``, ``float``, ``choice``, ``names``, ``numbers`` or ``text``: how a
    form, a flag or a page reads and shows the field ``name``."""
    hint = model.model_fields[name].annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        return "choice"
    if typing.get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if typing.get_origin(item) is Annotated:
            item = get_args(item)[0]
        return "names" if item is str else "numbers"
    return {bool: "bool", int: "int", float: "float"}.get(hint, "text")  # type: ignore[arg-type]


def choices(name: str, model: type[BaseModel] = Submission) -> tuple[str, ...]:
    return tuple(get_args(model.model_fields[name].annotation))


def bounds(name: str, model: type[BaseModel] = Submission) -> tuple[float, float]:
    """(low, high) of a number field, or of a list field's items."""
    info: FieldInfo = model.model_fields[name]
    metadata = list(info.metadata)
    for arg in get_args(info.annotation):  # a list's items: tuple[Annotated[float, ...], ...]
        for item in get_args(arg):
            for field in getattr(item, "__metadata__", ()):  # Annotated[float, Field(...)]
                metadata += getattr(field, "metadata", [])
    low = next((m.ge for m in metadata if isinstance(m, Ge)), -math.inf)
    high = next((m.le for m in metadata if isinstance(m, Le)), math.inf)
    return float(low), float(high)


def _message(
    error: Mapping[str, Any],
    field: str | None,
    model: type[BaseModel],
    limits: Mapping[str, tuple[float, float]],
) -> str:
    kind, value = error["type"], error.get("input")
    if field in model.model_fields and kind in ("greater_than_equal", "less_than_equal"):
        low, high = limits.get(field) or bounds(field, model)
        return f"must be between {low:g} and {high:g}, not {value!r}"
    if kind == "literal_error":
        return f"must be one of {', '.join(choices(str(field), model))}; got {value!r}"
    if kind == "int_from_float":
        return f"must be a whole number, not {value!r}"
    if kind in ("int_parsing", "float_parsing", "int_type", "float_type", "finite_number"):
        return f"must be a number, not {value!r}"
    if kind in ("too_short", "tuple_type") and field in ("content_layers", "style_layers"):
        return "give a list of one or more layer names"
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"
    if kind == "bool_type":
        return "must be true or false"
    if kind == "value_error" and isinstance(error.get("ctx", {}).get("error"), ValueError):
        return "must be true or false"
    return str(error["msg"])


def validate(
    model: type[M],
    values: Mapping[str, Any],
    limits: Mapping[str, tuple[float, float]] | None = None,
) -> M:
    """``values`` as ``model``, or the first problem as an :class:`OptionError`.
    ``limits``: narrower ranges the caller enforces (a service's ``size``), for the
    message of a value outside both."""
    for name, value in values.items():
        numeric = name in model.model_fields and field_kind(name, model) in ("int", "float")
        if isinstance(value, bool) and numeric:  # pydantic's lax mode reads True as 1
            raise OptionError(f"must be a number, not {value!r}", field=name)
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        raise OptionError(_message(first, field, model, limits or {}), field=field) from None


def form_text(value: Any) -> str:
    """A value as a form (or a flag) writes it: lists comma-separated, booleans as
    ``true``/``false``, nothing for None; what :func:`form_values` reads back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def form_values(form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """A multipart or urlencoded form (every value of every field) as :class:`Submission`
    takes it: a list field from all its values, any other from its last; a field left
    empty takes its default."""
    values: dict[str, Any] = {}
    for name, given in form.items():
        if not any(value.strip() for value in given):
            continue
        kind = field_kind(name) if name in SUBMISSION_FIELDS else "text"
        if kind in ("names", "numbers"):
            values[name] = list(given)
        elif kind in ("int", "float"):
            values[name] = _number_text(given[-1], int if kind == "int" else float)
        else:
            values[name] = given[-1]
    return values


def _number_text(text: str, kind: type) -> Any:
    """A number field's text as that number, so that an error quotes the number; text
    that is none ("auto", "abc") as it is, for the schema to judge."""
    for read in (kind, float):  # 12.5 for an int: "must be a whole number, not 12.5"
        try:
            return read(text.strip())
        except ValueError:
            continue
    return text


# -- The pyramid and the sizes: what the service and the engine both compute. ----------


def pyramid(size: int, scales: int, iterations: int) -> list[tuple[int, int]]:
    """(long side, iterations) per scale, coarsest first."""
    sides = [max(MIN_SIZE, round(size / 2 ** (scales - 1 - i))) for i in range(scales)]
    base, remainder = divmod(iterations, scales)
    counts = [base] * scales
    counts[-1] += remainder
    return list(zip(sides, counts, strict=True))


def auto_scales(size: int) -> int:
    scales = 1
    while scales < MAX_SCALES and size / 2**scales >= AUTO_PYRAMID_MIN_SIDE:
        scales += 1
    return scales


def plan_for(size: int, scales: int | None, iterations: int) -> list[tuple[int, int]]:
    """The pyramid of a job of these options (``scales`` None: the automatic choice), for
    the estimate of a job not yet submitted."""
    scales = min(scales or auto_scales(size), MAX_SCALES, iterations)
    return pyramid(size, scales, iterations)


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


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side ``long_side`` and the aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def scaled_pixels(size: tuple[int, int], long_side: int) -> int:
    """Pixels of an image of ``size`` resized so that its long side is ``long_side``."""
    width, height = scaled_size(*size, long_side)
    return width * height


def normalize_weights(weights: Sequence[float] | None, count: int, field: str) -> list[float]:
    """``weights`` scaled to sum to 1 (equal weights when None)."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise OptionError(f"expected {count} weights, got {len(values)}", field=field)
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise OptionError("weights must be finite and non-negative", field=field)
    total = sum(values)
    if total <= 0:
        raise OptionError("weights must not all be zero", field=field)
    return [w / total for w in values]


def _count(value: object, field: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise OptionError(f"must be between 0 and {high}, not {value!r}", field=field)
    return value


def check_options(
    *,
    styles: int,
    style_weights: Sequence[float] | None = None,
    preview_every: int = 0,
    checkpoint_every: int = 0,
    max_size: int = MAX_SIZE,
    **options: Any,
) -> dict[str, Any]:
    """Validate the options of a run without loading anything; returns them normalized.

    ``options`` are :class:`Options` fields (those left out take their defaults);
    ``styles`` is the number of style images; ``init`` may also be ``"image"`` (the caller
    gives the start). Raises :class:`OptionError` naming the offending field.
    """
    if styles < 1:
        raise OptionError("at least one style image is needed", field="style")
    init = options.get("init", DEFAULTS.init)
    if init == "image":
        options = {**options, "init": DEFAULTS.init}
    if options.get("style_strength", DEFAULTS.style_strength) is None:
        # A job's params with an explicit β keep no strength (see the end of this function).
        options = {k: v for k, v in options.items() if k != "style_strength"}
    checked = validate(Options, options)
    size, iterations = checked.size, checked.iterations
    if size > max_size:
        raise OptionError(f"must be between {MIN_SIZE} and {max_size}, not {size!r}", field="size")
    scales = auto_scales(size) if checked.scales is None else checked.scales
    if size / 2 ** (scales - 1) < MIN_SIZE:
        raise OptionError(
            f"{scales} scales would make the coarsest smaller than {MIN_SIZE} px", field="scales"
        )
    if scales > iterations:
        raise OptionError("needs at least one iteration per scale", field="scales")
    layer_names = BACKBONES[checked.backbone].layer_names
    for field in ("content_layers", "style_layers"):
        layers = getattr(checked, field)
        if len(set(layers)) != len(layers):
            # Every repeat would cost one Gram matrix more per step, for nothing.
            raise OptionError("names a layer more than once", field=field)
        unknown = [name for name in layers if name not in layer_names]
        if unknown:
            raise OptionError(
                f"{checked.backbone} has no layer {unknown[0]!r} (layers are named like relu4_2)",
                field=field,
            )
    style_layers = checked.style_layers
    if checked.style_layer_weights is None:
        layer_weights = halving_weights(len(style_layers))
    else:
        layer_weights = list(checked.style_layer_weights)
        if len(layer_weights) != len(style_layers):
            raise OptionError(
                f"{len(style_layers)} style layers but {len(layer_weights)} weights",
                field="style_layer_weights",
            )
    # An explicit β wins; the strength it overrides is not kept (it would mean nothing).
    explicit = checked.style_weight is not None
    values = checked.model_dump()
    values.update(
        style_weights=normalize_weights(style_weights, styles, "style_weights"),
        scales=scales,
        style_strength=None if explicit else checked.style_strength,
        style_weight=checked.style_weight if explicit else strength_to_weight(
            checked.style_strength
        ),
        content_layers=list(checked.content_layers),
        style_layers=list(style_layers),
        style_layer_weights=layer_weights,
        init=init,
        preview_every=_count(preview_every, "preview_every", MAX_ITERATIONS),
        checkpoint_every=_count(checkpoint_every, "checkpoint_every", MAX_ITERATIONS),
    )  # fmt: skip
    return values


def smallest_side(backbone: str, layers: Sequence[str]) -> int:
    """The shortest image side that still leaves one pixel at the deepest of ``layers``."""
    names = BACKBONES[backbone].layer_names
    deepest = max(names.index(layer) for layer in layers)
    return 2 ** sum(1 for name in names[:deepest] if name.startswith("pool"))


def style_side(style_size: tuple[int, int], long_side: int, options: Mapping[str, Any]) -> int:
    """A style's long side at a scale whose output long side is ``long_side``:
    ``style_scale`` times it, but never so small that the deepest style layer would have no
    pixel left."""
    needed = smallest_side(options["backbone"], options["style_layers"])
    aspect = max(style_size) / min(style_size)
    return max(round(long_side * options["style_scale"]), math.ceil(needed * aspect))


def lbfgs_history_for(pixels: int, history: int | None) -> int:
    """The pairs L-BFGS keeps on an image of ``pixels``: ``history`` if given, else
    LBFGS_HISTORY cut down to fit LBFGS_HISTORY_BUDGET_BYTES (never below 5)."""
    if history is not None:
        return history
    fits = LBFGS_HISTORY_BUDGET_BYTES // (LBFGS_PAIR_BYTES_PER_PIXEL * max(pixels, 1))
    return int(min(LBFGS_HISTORY, max(5, fits)))


def check_image_sizes(
    content: tuple[int, int], styles: Sequence[tuple[int, int]], options: Mapping[str, Any]
) -> None:
    """Refuse a coarsest scale too small for the deepest layer, before anything runs.
    ``content`` and ``styles`` are (width, height) sizes.

    Style images are not refused: the engine enlarges a style that would be too small.
    """
    needed = smallest_side(
        options["backbone"], [*options["content_layers"], *options["style_layers"]]
    )
    coarsest = pyramid(options["size"], options["scales"], options["iterations"])[0][0]
    short_side = coarsest * min(content) / max(content)
    if short_side < needed:
        raise OptionError(
            f"at {options['scales']} scale(s) the image would be {short_side:.0f} px on its "
            f"short side at the coarsest; {options['backbone']} needs {needed} px to reach its "
            "deepest layer: use fewer scales or a larger size",
            field="scales" if options["scales"] > 1 else "size",
        )


def options_reference() -> list[str]:
    """The Markdown table of every submission field: name, type, default, range or choices,
    and help (docs/api.md is made from it; a test keeps them equal)."""
    rows = ["| field | type | default | range or choices | what it does |", "|---|---|---|---|---|"]
    for name in SUBMISSION_FIELDS:
        info = Submission.model_fields[name]
        kind = field_kind(name)
        if kind == "choice":
            limits = ", ".join(f"`{choice}`" for choice in choices(name))
        elif kind in ("int", "float", "numbers"):
            low, high = bounds(name)
            number = "{:.0f}" if kind == "int" else "{:g}"
            limits = f"{number.format(low)} – {number.format(high)}" if math.isfinite(high) else ""
        else:
            limits = ""
        shown = form_text(info.default)
        unit = (info.json_schema_extra or {}).get("x-unit")  # type: ignore[union-attr]
        shown = f"{shown} {unit}" if shown and unit else shown
        kind_text = {"names": "list of names", "numbers": "list of numbers"}.get(kind, kind)
        rows.append(f"| `{name}` | {kind_text} | {shown} | {limits} | {info.description or ''} |")
    return rows


if __name__ == "__main__":
    # python -m shared.options docs/api.md: rewrite the file's table of the options.
    import sys
    from pathlib import Path

    from shared.config import rewrite_marked

    rewrite_marked(Path(sys.argv[1]), "options", options_reference())
