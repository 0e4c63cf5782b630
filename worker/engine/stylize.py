"""``stylize``: the one entry point of the engine.

This module imports neither torch nor the backbone: its options are the schema's
(shared/options.py), checked by :func:`shared.normalize.check_options` before anything heavy
is loaded. The optimization itself lives in :mod:`worker.engine.optimize`, imported when a
run starts; the types both share are :mod:`worker.engine.types`'.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image
from pydantic import ValidationError

from shared.errors import OptionError
from shared.normalize import check_image_sizes, check_options, normalize_weights
from shared.options import (
    DEFAULTS,
    INIT_FAST,
    MAX_ITERATIONS,
    OPTION_NAMES,
    InitName,
    OptimizerName,
    PoolingName,
    PrecisionName,
    RunOptions,
    StyleLossName,
)
from worker.engine.checkpoint import Checkpoint
from worker.engine.types import (
    CheckpointCallback,
    PreparedRun,
    ProgressCallback,
    Result,
    ResultCallback,
    Temporal,
)

#: The defaults of :func:`stylize`'s options, from the schema (shared/options.py).
_D = DEFAULTS
#: The most a ``preview_every`` or ``checkpoint_every`` may be: an option's iterations'.
MAX_EVERY = MAX_ITERATIONS


def stylize(
    *,
    content: Image.Image,
    styles: Sequence[Image.Image],
    style_weights: Sequence[float] | None = None,
    style_scale: float = _D.style_scale,
    size: int = _D.size,
    scales: int | None = _D.scales,
    iterations: int = _D.iterations,
    content_weight: float = _D.content_weight,
    style_strength: float = _D.style_strength,
    style_weight: float | None = _D.style_weight,
    tv_weight: float = _D.tv_weight,
    temporal_weight: float = _D.temporal_weight,
    content_layers: Sequence[str] = _D.content_layers,
    style_layers: Sequence[str] = _D.style_layers,
    style_layer_weights: Sequence[float] | None = _D.style_layer_weights,
    style_loss: StyleLossName = _D.style_loss,
    init: InitName | Image.Image = _D.init,
    optimizer: OptimizerName = _D.optimizer,
    lr: float = _D.lr,
    lbfgs_history: int | None = _D.lbfgs_history,
    backbone: str = _D.backbone,
    pooling: PoolingName = _D.pooling,
    original_colors: bool = _D.original_colors,
    seed: int | None = _D.seed,
    device: str = "auto",
    precision: PrecisionName = _D.precision,
    cuda_graphs: bool = True,
    progress: ProgressCallback | None = None,
    preview_every: int = 0,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
    resume_from: Checkpoint | None = None,
    temporal: Temporal | None = None,
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

    The options (``size`` to ``precision`` but ``device``) are the fields of
    :class:`shared.options.Options`: their defaults, ranges, choices, units and help are
    defined there, once (``stylequeue run --help`` lists them). How the engine reads some:
    ``scales`` splits ``iterations`` evenly (the remainder goes to the finest) and each
    scale starts from the previous result, upsampled; ``init`` may also be an image
    (``fast`` is one the caller makes); L-BFGS takes unit steps, Adam steps of ``lr``;
    ``original_colors`` transfers luminance only (YIQ) from styles whose luminance is
    matched to the content's mean and spread; ``precision=auto`` runs the backbone in bf16
    with channels_last where the hardware does that fast (CUDA; CPUs with AMX or
    AVX512-BF16), and Grams and losses are always fp32.

    Args:
        content: the photo; the output has its aspect ratio.
        styles: one or more style images.
        style_weights: blend weights of ``styles``, normalized to sum to 1 (default: equal).
        device: ``auto`` (cuda, then mps, then cpu) or a torch device string.
        cuda_graphs: on CUDA, capture each scale's step as a CUDA graph and replay it
            (bench/gpu.py); off, every step launches its kernels anew.
        progress: called after every iteration with an :class:`Iterate`; return True to
            stop: the run ends after that iteration and returns the current image.
        preview_every: attach a preview image to every N-th iterate (0: only the last).
        checkpoint_every: pass a :class:`Checkpoint` to ``on_checkpoint`` every N iterations
            (0: never).
        temporal: a video frame's temporal loss (Ruder et al. 2016), weighed by
            ``temporal_weight``: the previous stylized frame warped onto this one, and
            where the flow can be followed (worker/flow.py makes both).
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


def _prepare(arguments: dict[str, Any]) -> PreparedRun:
    started = time.perf_counter()
    content, styles, init = arguments["content"], arguments["styles"], arguments["init"]
    resume_from = arguments["resume_from"]
    if init == INIT_FAST:
        raise OptionError(
            "the engine starts from content, noise, style or an image: make the feed-forward "
            "picture (worker.feedforward) and pass it as init",
            field="init",
        )
    given = {name: arguments[name] for name in OPTION_NAMES}
    if not isinstance(init, str):
        given["init"] = "image"  # checked as a start the caller gives
    options = check_options(**given, styles=len(styles))
    style_weights = normalize_weights(arguments["style_weights"], len(styles), "style_weights")
    every = {name: _count(arguments[name], name) for name in ("preview_every", "checkpoint_every")}
    check_image_sizes(content.size, options)
    if resume_from is not None:
        seed = resume_from.seed
    else:
        seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    run = PreparedRun(
        options=options,
        style_weights=tuple(style_weights),
        seed=seed,
        inputs=_digest_inputs(content, styles, init),
        **every,
        content=content,
        styles=list(styles),
        init_image=None if isinstance(init, str) else init,
        device=arguments["device"],
        cuda_graphs=bool(arguments["cuda_graphs"]),
        progress=arguments["progress"],
        on_checkpoint=arguments["on_checkpoint"],
        resume_from=resume_from,
        temporal=arguments["temporal"],
        started=started,
    )
    if resume_from is not None:
        _check_resumable(resume_from, run)
    return run


def _count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EVERY:
        raise OptionError(f"must be between 0 and {MAX_EVERY}, not {value!r}", field=field)
    return value


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


# What may change between a checkpoint and its resume: where and how fast it runs, and how
# often it reports.
_RESUME_MAY_DIFFER = {"precision", "preview_every", "checkpoint_every", "seed"}


def _check_resumable(checkpoint: Checkpoint, run: PreparedRun) -> None:
    saved = checkpoint.options
    # Read through the model: an option added after the checkpoint was made ran at its
    # default then.
    try:
        was = RunOptions.of_job({k: v for k, v in saved.items() if k in RunOptions.model_fields})
    except ValidationError as error:
        message = f"the checkpoint's options are unreadable: {error.errors()[0]['msg']}"
        raise OptionError(message, field="resume_from") from None
    now = run.checkpoint_options()
    for name, value in now.items():
        if name in _RESUME_MAY_DIFFER:
            continue
        if name in RunOptions.model_fields:
            same = getattr(was, name) == getattr(run.options, name)
        else:
            same = saved.get(name) == value
        if not same:
            raise OptionError(
                f"the checkpoint was made with {name}={saved.get(name)!r}, not {value!r}",
                field="resume_from",
            )
    if not 0 <= checkpoint.iteration < run.options.iterations:
        raise OptionError(
            f"the checkpoint is at iteration {checkpoint.iteration} of {run.options.iterations}",
            field="resume_from",
        )
