"""The engine's data types: what :func:`worker.engine.stylize` reports and returns, and a
run prepared for :func:`worker.engine.optimize.optimize`. Torch-free, so that the service
and ``import worker.engine`` reach them without loading torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shared.options import RunOptions
from shared.pyramid import pyramid, scaled_size
from worker.engine.checkpoint import Checkpoint


@dataclass(frozen=True)
class Iterate:
    """What the progress callback receives after every iteration.

    The loss parts are weighted (``loss == content + style + tv + temporal``) and are
    those of the image the iteration started from: the value the optimizer evaluated.
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
    #: A video frame's temporal loss (:class:`Temporal`); 0 for a photo.
    temporal: float = 0.0
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


@dataclass(frozen=True)
class Temporal:
    """What a video frame's temporal loss compares with (Ruder et al. 2016): the previous
    stylized frame warped onto this one, and per pixel 1 where the flow can be followed,
    else 0 (a (height, width) array of the frame's size; worker/flow.py makes both)."""

    target: Image.Image
    weights: Any  # numpy.ndarray; Any keeps numpy's import out of the engine's types


ProgressCallback = Callable[[Iterate], bool | None]
CheckpointCallback = Callable[[Checkpoint], None]
#: ``stylize_together``'s: the index of a run that ended, and its result or exception.
ResultCallback = Callable[[int, "Result | Exception"], None]


@dataclass(frozen=True)
class PreparedRun:
    """A run :func:`worker.engine.stylize` would make, its options checked: what
    :func:`worker.engine.stylize_together` takes. Made by :func:`worker.engine.prepare`."""

    options: RunOptions
    #: The styles' blend weights, normalized.
    style_weights: tuple[float, ...]
    #: The seed, drawn if the options left it open (a resumed run's is its checkpoint's).
    seed: int
    #: Digests of the content, the styles and the start (``init``), checked on resume.
    inputs: dict[str, Any]
    preview_every: int
    checkpoint_every: int
    content: Image.Image
    styles: list[Image.Image]
    init_image: Image.Image | None
    device: str
    cuda_graphs: bool
    progress: ProgressCallback | None
    on_checkpoint: CheckpointCallback | None
    resume_from: Checkpoint | None
    #: A video frame's temporal loss target; None for a photo.
    temporal: Temporal | None
    #: ``time.perf_counter()`` when it was prepared: its iterates' ``elapsed`` count from here.
    started: float

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        # A video frame's run is never batched: its frames follow one another.
        resumed = self.resume_from is not None or self.temporal is not None
        return batch_key(self.options, self.content.size, self.device, resumed=resumed)

    def checkpoint_options(self) -> dict[str, Any]:
        """What a checkpoint stores of the run, and a resume checks: its options, the
        styles' weights, the cadence of its reports, its inputs and its seed."""
        return {
            **self.options.stored(),
            "seed": self.seed,
            "style_weights": list(self.style_weights),
            "preview_every": self.preview_every,
            "checkpoint_every": self.checkpoint_every,
            "inputs": self.inputs,
        }


def batch_key(
    options: RunOptions, content_size: tuple[int, int], device: str, *, resumed: bool = False
) -> tuple[Any, ...] | None:
    """What runs that share a batch must have in common; None for a resumed run (its
    iterations and scale are its own). ``content_size`` is the content's (width, height)."""
    if resumed:
        return None
    plan = pyramid(options.size, options.scales, options.iterations)
    shapes = tuple(scaled_size(*content_size, side) for side, _ in plan)
    return (
        device, options.backbone, options.pooling, options.precision,
        tuple(options.content_layers), tuple(options.style_layers), tuple(plan), shapes,
    )  # fmt: skip
