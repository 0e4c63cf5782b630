"""Optical flow between video frames, and what Ruder, Dosovitskiy & Brox's *Artistic style
transfer for videos* (GCPR 2016) build on it: a stylized frame warped to the next one, and
the pixels whose motion the flow can follow.

The flow is OpenCV's DIS (Kroeger et al., ECCV 2016), which needs no weights; Ruder et al.
use DeepFlow or EpicFlow. No torch here: images are float32 arrays of (height, width, 3) in
[0, 1], flows (height, width, 2) in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def as_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))


def flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Where each pixel of ``source`` moves in ``target``: (dx, dy) per pixel."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey = [cv2.cvtColor((x * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for x in (source, target)]
    return dis.calc(grey[0], grey[1], None)


def warp(image: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """``image`` (a frame, or its stylized picture) moved to the next frame: ``backward``
    is the next frame's flow back to this one, so each pixel reads where it came from."""
    height, width = backward.shape[:2]
    grid_x, grid_y = np.meshgrid(
        np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    )
    return cv2.remap(
        image, grid_x + backward[..., 0], grid_y + backward[..., 1],
        interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )  # fmt: skip


def consistency(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Ruder et al.'s weights c (their eq. 5 and 6): 1 where the flow can be followed, 0 where
    the next frame's pixel was hidden before (the forward and the backward flow disagree),
    lies on a motion boundary, or came from outside the frame (what a pan brings in: the
    warp can only smear the edge there). ``forward`` is this frame's flow to the next,
    ``backward`` the next frame's flow back; the result is the next frame's (height, width)."""
    # The forward flow read where each pixel of the next frame came from.
    carried = warp(forward, backward)
    disagree = np.sum((carried + backward) ** 2, axis=-1)
    scale = np.sum(carried**2, axis=-1) + np.sum(backward**2, axis=-1)
    occluded = disagree > 0.01 * scale + 0.5
    grad_u = np.gradient(backward[..., 0])
    grad_v = np.gradient(backward[..., 1])
    boundary = grad_u[0] ** 2 + grad_u[1] ** 2 + grad_v[0] ** 2 + grad_v[1] ** 2
    boundary_mask = boundary > 0.01 * np.sum(backward**2, axis=-1) + 0.002
    height, width = backward.shape[:2]
    grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
    source_x, source_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
    outside = (source_x < 0) | (source_x > width - 1) | (source_y < 0) | (source_y > height - 1)
    return (~(occluded | boundary_mask | outside)).astype(np.float32)


@dataclass(frozen=True)
class Motion:
    """From one frame to the next: the next frame's flow back, and its weights c."""

    backward: np.ndarray
    weights: np.ndarray


def motion(previous: np.ndarray, current: np.ndarray) -> Motion:
    """The flows both ways between two frames (of the source video, not stylized)."""
    forward = flow(previous, current)
    backward = flow(current, previous)
    return Motion(backward=backward, weights=consistency(forward, backward))


def warping_error(frames: list[np.ndarray], sources: list[np.ndarray]) -> float:
    """Flicker: the mean squared difference between each frame and the one before it warped
    onto it, on the pixels the source's flow can follow (the flow from ``sources``)."""
    errors = []
    for index in range(1, len(frames)):
        step = motion(sources[index - 1], sources[index])
        moved = warp(frames[index - 1], step.backward)
        squared = np.sum((frames[index] - moved) ** 2, axis=-1)
        errors.append(float(np.sum(step.weights * squared) / max(float(step.weights.sum()), 1.0)))
    return float(np.mean(errors)) if errors else 0.0
