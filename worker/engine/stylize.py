"""``stylize``: the one entry point of the engine, and the options it takes.

This module imports neither torch nor the backbone: its signature is where the command line
(and the API and web form of the job service) read every default, and :func:`check_options`
validates a request before anything heavy is loaded. The optimization itself lives in
:mod:`worker.engine.optimize`, imported when a run starts.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from PIL import Image

from shared.errors import OptionError
from worker.engine.checkpoint import Checkpoint
from worker.engine.registry import BACKBONES, DEFAULT_BACKBONE

InitName = Literal["content", "noise", "style"]
OptimizerName = Literal["lbfgs", "adam"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PoolingName = Literal["max", "avg"]

INIT_CHOICES: tuple[str, ...] = get_args(InitName)
OPTIMIZER_CHOICES: tuple[str, ...] = get_args(OptimizerName)
PRECISION_CHOICES: tuple[str, ...] = get_args(PrecisionName)
POOLING_CHOICES: tuple[str, ...] = get_args(PoolingName)

#: Limits of the options; the service narrows ``size`` further with its own settings.
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
DEFAULT_TV_WEIGHT = 3.0
#: The automatic pyramid halves the size while the coarsest scale stays at least this long.
AUTO_PYRAMID_MIN_SIDE = 128


@dataclass(frozen=True)
class Iterate:
    """What the progress callback receives after every iteration.

    The loss parts are weighted (``loss == content + style + tv``) and are those of the
    image the iteration started from: the value the optimizer evaluated.
    """

    iteration: int  #: iterations completed, 1-based, over all scales
    total: int  #: iterations the run will make in all
    scale: int  #: index of the current pyramid scale, 0 = coarsest
    scales: int  #: number of scales
    loss: float
    content: float
    style: float
    tv: float
    elapsed: float  #: seconds since this run (or this resumed run) started
    #: Every ``preview_every`` iterations (and at the last one): the current image.
    preview: Image.Image | None = None


@dataclass(frozen=True)
class Result:
    image: Image.Image
    iterations: int  #: iterations completed, including those before a resume
    total: int
    stopped: bool  #: True when the callback asked to stop before ``total``
    last: Iterate | None  #: the last iterate (None when resumed at the very end)
    seed: int
    device: str
    precision: str  #: the precision actually used, ``auto`` resolved
    elapsed: float


ProgressCallback = Callable[[Iterate], bool | None]
CheckpointCallback = Callable[[Checkpoint], None]
#: ``stylize_together``'s: the index of a run that ended, and its result or exception.
ResultCallback = Callable[[int, "Result | Exception"], None]


def stylize(
    *,
    content: Image.Image,
    styles: Sequence[Image.Image],
    style_weights: Sequence[float] | None = None,
    style_scale: float = 1.0,
    size: int = 512,
    scales: int | None = None,
    iterations: int = 300,
    content_weight: float = 1.0,
    style_strength: float = DEFAULT_STYLE_STRENGTH,
    style_weight: float | None = None,
    tv_weight: float = DEFAULT_TV_WEIGHT,
    content_layers: Sequence[str] = ("relu4_2",),
    style_layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
    style_layer_weights: Sequence[float] | None = None,
    init: InitName | Image.Image = "content",
    optimizer: OptimizerName = "lbfgs",
    lr: float = 0.02,
    lbfgs_history: int | None = None,
    backbone: str = DEFAULT_BACKBONE,
    pooling: PoolingName = "max",
    original_colors: bool = False,
    seed: int | None = None,
    device: str = "auto",
    precision: PrecisionName = "auto",
    progress: ProgressCallback | None = None,
    preview_every: int = 0,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
    resume_from: Checkpoint | None = None,
) -> Result:
    """Render ``content`` in the style of ``styles`` (Gatys, Ecker & Bethge, CVPR 2016).

    Optimizes the pixels of an image so that its ``content_layers`` features match the
    content image's (MSE) and the Gram matrices of its ``style_layers`` features match the
    styles' (weighted MSE; see :func:`worker.engine.losses.gram_matrix` for the
    normalization), plus a total-variation term:
    L = content_weight·L_content + style_weight·Σ_l w_l·L_style,l + tv_weight·L_tv.
    Each content and style term is relative to its target's mean square
    (:func:`worker.engine.losses.relative_scale`), so the weights mean the same on every
    backbone, layer, size and scale; Gatys et al. weigh raw squared errors instead.

    Unlike Gatys et al., who optimize unconstrained pixels, the pixels stay in [0, 1] (a
    projected step for both optimizers): the image a user gets is clamped anyway, and
    optimizing what is delivered reaches a lower loss on it (``docs/benchmarks.md``).

    Args:
        content: the photo; the output has its aspect ratio.
        styles: one or more style images.
        style_weights: blend weights of ``styles``, normalized to sum to 1 (default: equal).
        style_scale: long side of each style image relative to the output's.
        size: long side of the output, in pixels.
        scales: number of coarse-to-fine scales, each twice the previous one's size, the last
            being ``size``; ``iterations`` is split evenly across them (the remainder goes
            to the finest) and each scale starts from the previous result, upsampled.
            ``None`` chooses: halve while the coarsest stays ≥ 128 px (1 scale up to 255 px).
        iterations: optimizer steps in all; one loss evaluation each, for both optimizers.
        content_weight: α, the weight of the content loss.
        style_strength: how strongly the painting shows, 0–1: 0 barely touches the photo,
            1 lays the painting's texture over the scene's outline. Sets β on a log scale
            (:func:`strength_to_weight`: 0.1 at 0, 3.2 at 0.5, 100 at 1).
        style_weight: β, the weight of the style loss; given, it overrides
            ``style_strength``.
        tv_weight: γ, the weight of the total-variation loss.
        content_layers: backbone layers whose features are matched to the content's.
        style_layers: backbone layers whose Gram matrices are matched to the styles'.
        style_layer_weights: w_l per style layer (default: 1/len(style_layers) each, as in
            the paper).
        init: ``content``, ``noise`` (uniform, from ``seed``), ``style`` (the first style,
            resized to the content's shape) or an image.
        optimizer: ``lbfgs`` (unit steps, history 100; see :mod:`worker.engine.lbfgs`) or
            ``adam``.
        lr: Adam's learning rate, in [0, 1] pixel units; L-BFGS takes unit steps.
        lbfgs_history: curvature pairs L-BFGS keeps (each two fp32 copies of the image:
            24 bytes a pixel). ``None``: 100, fewer where that would pass 2 GiB (at least
            5): 100 up to about 900×900 px, 21 at 2048×2048 (:func:`lbfgs_history_for`).
        backbone: a name from :data:`worker.engine.registry.BACKBONES`.
        pooling: ``max`` as in VGG, or ``avg``, which Gatys et al. found gives smoother
            results.
        original_colors: keep the content's chroma, transferring only luminance (YIQ), from
            styles whose luminance is matched to the content's mean and spread.
        seed: makes ``noise`` init reproducible; same seed, device and options → same
            image. ``None`` draws one, returned in the result.
        device: ``auto`` (cuda, then mps, then cpu) or a torch device string.
        precision: ``auto`` runs the backbone in bf16 with channels_last where the hardware
            does that fast (CUDA; CPUs with AMX or AVX512-BF16) and fp32 elsewhere. Grams and
            losses are always fp32.
        progress: called after every iteration with an :class:`Iterate`; return True to
            stop: the run ends after that iteration and returns the current image.
        preview_every: attach a preview image to every N-th iterate (0: only the last).
        checkpoint_every: pass a :class:`Checkpoint` to ``on_checkpoint`` every N iterations
            (0: never).
        resume_from: continue a run from a checkpoint made with the same options and inputs;
            the run then completes the original ``iterations``. Adam's moments are restored
            exactly; L-BFGS restarts its curvature history at the checkpoint (storing it
            would cost up to 200 image-sized vectors), so a resumed L-BFGS run follows a
            slightly different path to a similar loss.

    Raises:
        OptionError, ImageError, WeightsError: bad options, inputs or missing weights.
    """
    run = _prepare(dict(locals()))  # this call's arguments, defaults included
    from worker.engine.optimize import optimize  # torch is imported here, not before

    (result,) = optimize([run])  # a lone run raises what ends it
    assert isinstance(result, Result)
    return result


@dataclass(frozen=True)
class PreparedRun:
    """A run :func:`stylize` would make, its options checked: what :func:`stylize_together`
    takes. Made by :func:`prepare`."""

    options: dict[str, Any]
    content: Image.Image
    styles: list[Image.Image]
    init_image: Image.Image | None
    device: str
    progress: ProgressCallback | None
    on_checkpoint: CheckpointCallback | None
    resume_from: Checkpoint | None
    #: ``time.perf_counter()`` when it was prepared: its iterates' ``elapsed`` count from here.
    started: float

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        resumed = self.resume_from is not None
        return batch_key(self.options, self.content.size, self.device, resumed=resumed)


def prepare(**arguments: Any) -> PreparedRun:
    """:func:`stylize`'s keyword arguments (its defaults for those left out), checked."""
    bound = inspect.signature(stylize).bind(**arguments)
    bound.apply_defaults()
    return _prepare(bound.arguments)


def stylize_together(
    runs: Sequence[PreparedRun], *, on_result: ResultCallback | None = None
) -> list[Result | Exception]:
    """Several runs at once, their images one batch through the backbone.

    Each image keeps its own options, targets, optimizer, callbacks and seed; one forward
    and one backward pass serve them all, which pays for small images, whose passes alone
    leave the hardware partly idle, and not for large ones (bench/batching.py on a CPU,
    bench/gpu.py on a GPU).

    A run whose callback stops it leaves the batch; so does one whose callback raises, and
    that exception is its outcome in the list returned (an error of the batch itself, in
    the backbone say, is raised). ``on_result(index, outcome)`` is called as soon as the
    run at ``index`` ends, before the batch does. Several runs must share a
    :attr:`PreparedRun.batch_key` (same device, backbone, layers, precision, iterations
    and pyramid, and images of the same shape at every scale) and none may resume from a
    checkpoint: else :class:`OptionError`. A lone run may be any run.
    """
    keys = {run.batch_key for run in runs}
    if not runs or (len(runs) > 1 and (None in keys or len(keys) != 1)):
        raise OptionError(
            "runs batch together only with the same device, backbone, layers, precision, "
            "iterations, pyramid and image shape, and none resumed",
            field="runs",
        )
    from worker.engine.optimize import optimize

    return optimize(list(runs), on_result)


def batch_key(
    options: dict[str, Any], content_size: tuple[int, int], device: str, *, resumed: bool = False
) -> tuple[Any, ...] | None:
    """What runs that share a batch must have in common; None for a resumed run (its
    iterations and scale are its own). ``content_size`` is the content's (width, height)."""
    if resumed:
        return None
    plan = pyramid(options["size"], options["scales"], options["iterations"])
    shapes = tuple(scaled_size(*content_size, side) for side, _ in plan)
    return (
        device, options["backbone"], options["pooling"], options["precision"],
        tuple(options["content_layers"]), tuple(options["style_layers"]), tuple(plan), shapes,
    )  # fmt: skip


def strength_to_weight(strength: float) -> float:
    """β for a ``style_strength`` in [0, 1]: log-linear over STYLE_WEIGHT_LOG10_RANGE, since
    what a person sees change is the ratio of the weights, not their difference."""
    low, high = STYLE_WEIGHT_LOG10_RANGE
    return 10.0 ** (low + (high - low) * strength)


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side ``long_side`` and the aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _prepare(arguments: dict[str, Any]) -> PreparedRun:
    started = time.perf_counter()
    content, styles, init = arguments["content"], arguments["styles"], arguments["init"]
    resume_from = arguments["resume_from"]
    option_names = inspect.signature(check_options).parameters.keys() - {"styles", "max_size"}
    given = {name: arguments[name] for name in option_names}
    options = check_options(
        **{**given, "styles": len(styles), "init": init if isinstance(init, str) else "image"}
    )
    check_image_sizes(content.size, [style.size for style in styles], options)
    options["original_colors"] = bool(arguments["original_colors"])
    options["inputs"] = _digest_inputs(content, styles, init)
    if resume_from is not None:
        _check_resumable(resume_from, options)
        options["seed"] = resume_from.seed
    elif options["seed"] is None:
        options["seed"] = secrets.randbelow(2**31)
    return PreparedRun(
        options=options,
        content=content,
        styles=list(styles),
        init_image=None if isinstance(init, str) else init,
        device=arguments["device"],
        progress=arguments["progress"],
        on_checkpoint=arguments["on_checkpoint"],
        resume_from=resume_from,
        started=started,
    )


def defaults() -> dict[str, Any]:
    """Every option's default, read from :func:`stylize`'s signature."""
    return {
        name: param.default
        for name, param in inspect.signature(stylize).parameters.items()
        if param.default is not inspect.Parameter.empty
    }


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


def _number(value: object, field: str, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"must be a number, not {value!r}", field=field)
    if kind is int and value != int(value):
        raise OptionError(f"must be a whole number, not {value!r}", field=field)
    if not math.isfinite(value) or not low <= value <= high:
        raise OptionError(f"must be between {low:g} and {high:g}, not {value!r}", field=field)
    return kind(value)


def _choice(value: object, field: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise OptionError(f"must be one of {', '.join(choices)}; got {value!r}", field=field)
    return str(value)


def check_options(
    *,
    styles: int,
    style_weights: Sequence[float] | None,
    style_scale: float,
    size: int,
    scales: int | None,
    iterations: int,
    content_weight: float,
    style_strength: float,
    style_weight: float | None,
    tv_weight: float,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    style_layer_weights: Sequence[float] | None,
    init: str,
    optimizer: str,
    lr: float,
    lbfgs_history: int | None,
    backbone: str,
    pooling: str,
    seed: int | None,
    precision: str,
    preview_every: int,
    checkpoint_every: int,
    max_size: int = MAX_SIZE,
) -> dict[str, Any]:
    """Validate the options of a run without loading anything; returns them normalized.

    ``styles`` is the number of style images, ``init`` an init name or ``"image"``.
    Raises :class:`OptionError` naming the offending field.
    """
    if styles < 1:
        raise OptionError("at least one style image is needed", field="style")
    size = _number(size, "size", int, MIN_SIZE, max_size)
    iterations = _number(iterations, "iterations", int, 1, MAX_ITERATIONS)
    if scales is None:
        scales = auto_scales(size)
    scales = _number(scales, "scales", int, 1, MAX_SCALES)
    if size / 2 ** (scales - 1) < MIN_SIZE:
        raise OptionError(
            f"{scales} scales would make the coarsest smaller than {MIN_SIZE} px", field="scales"
        )
    if scales > iterations:
        raise OptionError("needs at least one iteration per scale", field="scales")
    if backbone not in BACKBONES:
        raise OptionError(
            f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}",
            field="backbone",
        )
    layer_names = BACKBONES[backbone].layer_names
    for field, layers in (("content_layers", content_layers), ("style_layers", style_layers)):
        if isinstance(layers, str) or not layers:
            raise OptionError("give a list of one or more layer names", field=field)
        if len(set(layers)) != len(layers):
            # Every repeat would cost one Gram matrix more per step, for nothing.
            raise OptionError("names a layer more than once", field=field)
        unknown = [name for name in layers if name not in layer_names]
        if unknown:
            raise OptionError(
                f"{backbone} has no layer {unknown[0]!r} (layers are named like relu4_2)",
                field=field,
            )
    if style_layer_weights is None:
        layer_weights = [1.0 / len(style_layers)] * len(style_layers)
    else:
        layer_weights = [float(w) for w in style_layer_weights]
        if len(layer_weights) != len(style_layers):
            raise OptionError(
                f"{len(style_layers)} style layers but {len(layer_weights)} weights",
                field="style_layer_weights",
            )
        for weight in layer_weights:
            _number(weight, "style_layer_weights", float, 0, 1e12)
    if seed is not None:
        seed = _number(seed, "seed", int, 0, 2**63 - 1)
    # An explicit β wins; the strength it overrides is not kept (it would mean nothing).
    strength = (
        None
        if style_weight is not None
        else _number(style_strength, "style_strength", float, 0.0, 1.0)
    )
    return {
        "style_weights": normalize_weights(style_weights, styles, "style_weights"),
        "style_scale": _number(style_scale, "style_scale", float, 0.05, 4.0),
        "size": size,
        "scales": scales,
        "iterations": iterations,
        "content_weight": _number(content_weight, "content_weight", float, 0, 1e12),
        "style_strength": strength,
        "style_weight": strength_to_weight(strength)
        if style_weight is None
        else _number(style_weight, "style_weight", float, 0, 1e12),
        "tv_weight": _number(tv_weight, "tv_weight", float, 0, 1e12),
        "content_layers": list(content_layers),
        "style_layers": list(style_layers),
        "style_layer_weights": layer_weights,
        "init": _choice(init, "init", (*INIT_CHOICES, "image")),
        "optimizer": _choice(optimizer, "optimizer", OPTIMIZER_CHOICES),
        "lr": _number(lr, "lr", float, 1e-6, 10.0),
        "lbfgs_history": None
        if lbfgs_history is None
        else _number(lbfgs_history, "lbfgs_history", int, 1, MAX_LBFGS_HISTORY),
        "backbone": backbone,
        "pooling": _choice(pooling, "pooling", POOLING_CHOICES),
        "seed": seed,
        "precision": _choice(precision, "precision", PRECISION_CHOICES),
        "preview_every": _number(preview_every, "preview_every", int, 0, MAX_ITERATIONS),
        "checkpoint_every": _number(checkpoint_every, "checkpoint_every", int, 0, MAX_ITERATIONS),
    }


def smallest_side(backbone: str, layers: Sequence[str]) -> int:
    """The shortest image side that still leaves one pixel at the deepest of ``layers``."""
    names = BACKBONES[backbone].layer_names
    deepest = max(names.index(layer) for layer in layers)
    return 2 ** sum(1 for name in names[:deepest] if name.startswith("pool"))


def style_side(style_size: tuple[int, int], long_side: int, options: dict[str, Any]) -> int:
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


def scaled_pixels(size: tuple[int, int], long_side: int) -> int:
    """Pixels of an image of ``size`` resized so that its long side is ``long_side``."""
    scale = long_side / max(size)
    return max(1, round(size[0] * scale)) * max(1, round(size[1] * scale))


def check_image_sizes(
    content: tuple[int, int], styles: Sequence[tuple[int, int]], options: dict[str, Any]
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


# Options that may change between a checkpoint and its resume: where and how fast it runs,
# and how often it reports.
_RESUME_MAY_DIFFER = {"precision", "preview_every", "checkpoint_every", "seed"}


def _digest_inputs(
    content: Image.Image, styles: Sequence[Image.Image], init: str | Image.Image
) -> dict[str, Any]:
    def digest(image: Image.Image) -> str:
        return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]

    return {
        "content": digest(content),
        "styles": [digest(style) for style in styles],
        "init": init if isinstance(init, str) else digest(init),
    }


def _check_resumable(checkpoint: Checkpoint, options: dict[str, Any]) -> None:
    saved = checkpoint.options
    for name, value in options.items():
        if name in _RESUME_MAY_DIFFER:
            continue
        if saved.get(name) != value:
            raise OptionError(
                f"the checkpoint was made with {name}={saved.get(name)!r}, not {value!r}",
                field="resume_from",
            )
    if not 0 <= checkpoint.iteration < options["iterations"]:
        raise OptionError(
            f"the checkpoint is at iteration {checkpoint.iteration} of {options['iterations']}",
            field="resume_from",
        )
