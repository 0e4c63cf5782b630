"""A run's options checked and normalized into :class:`shared.options.RunOptions`, without
loading anything: what the service does before it queues a job and the engine before it
runs one, so that a job the service accepts is one the engine takes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shared.backbones import BACKBONES
from shared.errors import OptionError
from shared.fields import validate
from shared.options import (
    DEFAULTS,
    MAX_SIZE,
    Options,
    RunOptions,
    halving_weights,
    strength_to_weight,
)
from shared.pyramid import MIN_SIZE, auto_scales, pyramid


def check_options(*, styles: int, max_size: int = MAX_SIZE, **options: Any) -> RunOptions:
    """Validate the options of a run; returns them normalized.

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
    return RunOptions(
        **{
            **dict(checked),
            "scales": scales,
            "style_strength": None if explicit else checked.style_strength,
            "style_weight": checked.style_weight
            if explicit
            else strength_to_weight(checked.style_strength),
            "style_layer_weights": tuple(layer_weights),
            "init": init,
        }
    )


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


def smallest_side(backbone: str, layers: Sequence[str]) -> int:
    """The shortest image side that still leaves one pixel at the deepest of ``layers``."""
    names = BACKBONES[backbone].layer_names
    deepest = max(names.index(layer) for layer in layers)
    return 2 ** sum(1 for name in names[:deepest] if name.startswith("pool"))


def style_side(style_size: tuple[int, int], long_side: int, options: RunOptions) -> int:
    """A style's long side at a scale whose output long side is ``long_side``:
    ``style_scale`` times it, but never so small that the deepest style layer would have no
    pixel left."""
    needed = smallest_side(options.backbone, options.style_layers)
    aspect = max(style_size) / min(style_size)
    return max(round(long_side * options.style_scale), math.ceil(needed * aspect))


def check_image_sizes(content: tuple[int, int], options: RunOptions) -> None:
    """Refuse a coarsest scale too small for the deepest layer, before anything runs.
    ``content`` is the photo's (width, height).

    Style images are not refused: the engine enlarges a style that would be too small.
    """
    needed = smallest_side(options.backbone, [*options.content_layers, *options.style_layers])
    coarsest = pyramid(options.size, options.scales, options.iterations)[0][0]
    short_side = coarsest * min(content) / max(content)
    if short_side < needed:
        raise OptionError(
            f"at {options.scales} scale(s) the image would be {short_side:.0f} px on its "
            f"short side at the coarsest; {options.backbone} needs {needed} px to reach its "
            "deepest layer: use fewer scales or a larger size",
            field="scales" if options.scales > 1 else "size",
        )
