"""A run of video frames through the engine, after Ruder, Dosovitskiy & Brox, *Artistic
style transfer for videos* (GCPR 2016): each frame starts from the previous stylized frame
warped by the optical flow, and a temporal loss keeps it there on the pixels the flow can
follow (worker/flow.py). A run's first frame starts as a photo's job does.

Where we differ from the paper: a run's frames after the first make half the job's
iterations on one scale (the warped start is already most of the way; the paper also gives
later frames fewer), and a video is cut into runs that workers take in parallel, their
overlapping frames blended at each seam (:func:`seam_weight`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shared.options import RunOptions
from shared.parts import later_frame_iterations
from worker.engine import Iterate, Result, Temporal, stylize
from worker.flow import as_array, as_image, motion, warp


@dataclass(frozen=True)
class Frame:
    """One stylized frame of a run: its index in the video and its picture."""

    index: int
    result: Result


def stylize_frames(
    frames: Sequence[Image.Image],
    *,
    first_index: int,
    styles: Sequence[Image.Image],
    style_weights: Sequence[float],
    options: RunOptions,
    progress: Callable[[Iterate], bool | None] | None = None,
    start_after: tuple[Image.Image, Image.Image] | None = None,
    **engine: Any,
) -> Iterator[Frame]:
    """Stylize ``frames`` (the video's ``first_index`` onwards) one after another, each
    from the one before; yields each as it is done.

    ``start_after``: (the source frame, its stylized picture) of the frame before
    ``frames[0]``, made earlier (a run resumed after its first frames). ``progress`` hears
    every iteration of every frame; True stops the run after that iteration. ``engine``:
    more of :func:`stylize`'s arguments (device, precision...).
    """
    arguments = options.engine_arguments()
    previous = (as_array(start_after[0]), as_array(start_after[1])) if start_after else None
    for offset, frame in enumerate(frames):
        index = first_index + offset
        source = as_array(frame)
        frame_arguments = dict(arguments)
        temporal = None
        if previous is not None:
            step = motion(previous[0], source)
            warped = as_image(warp(previous[1], step.backward))
            temporal = Temporal(target=warped, weights=step.weights)
            frame_arguments.update(
                init=warped, scales=1, iterations=later_frame_iterations(options)
            )
        result = stylize(
            content=frame,
            styles=styles,
            style_weights=style_weights,
            temporal=temporal,
            progress=progress,
            **frame_arguments,
            **engine,
        )
        yield Frame(index=index, result=result)
        if result.stopped:
            return
        previous = (source, as_array(result.image))
