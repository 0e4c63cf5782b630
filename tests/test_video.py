"""The math and the codecs under video jobs: cutting a video into runs, the seams' blend,
the optical flow's warp and consistency check (Ruder et al.), the temporal loss, and
MP4s that keep a source's frame count, rate and sound."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.parts import cut
from shared.video import VideoLimits, decode_frames, encode_mp4, pan_clip, probe_video, video_info
from worker.engine.losses import TemporalLoss
from worker.flow import as_array, consistency, flow, motion, warp, warping_error
from worker.parts import seam_weight

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LIMITS = VideoLimits(max_frames=500, max_seconds=60, max_pixels=10**7)


@pytest.mark.parametrize(
    ("frames", "run", "seam", "expected"),
    [
        (12, 6, 2, [(0, 6, 0), (6, 12, 2)]),
        (13, 6, 2, [(0, 6, 0), (6, 13, 2)]),  # a last run of one frame joins the one before
        (16, 6, 2, [(0, 6, 0), (6, 12, 2), (12, 16, 2)]),
        (5, 12, 2, [(0, 5, 0)]),
        (12, 4, 0, [(0, 4, 0), (4, 8, 0), (8, 12, 0)]),
    ],
)
def test_a_video_is_cut_into_runs_that_cover_every_frame_once(
    frames: int, run: int, seam: int, expected: list[tuple[int, int, int]]
) -> None:
    runs = cut(frames, run, seam)
    assert [(r.start, r.stop, r.overlap) for r in runs] == expected
    owned = [index for r in runs for index in range(r.start, r.stop)]
    assert owned == list(range(frames))


def test_a_seam_moves_linearly_from_the_earlier_run_to_the_later() -> None:
    # The later run starts at 10 and also makes 8 and 9: a third, then two thirds of it.
    assert [seam_weight(i, 10, 2) for i in (8, 9)] == pytest.approx([1 / 3, 2 / 3])


def shifted_pair(shift: int = 3) -> tuple[np.ndarray, np.ndarray]:
    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((200, 120))
    array = as_array(photo)
    return array[:, :160], array[:, shift : 160 + shift]  # the camera pans right


def test_the_flow_follows_a_pan_and_the_warp_undoes_it() -> None:
    before, after = shifted_pair(3)
    backward = flow(after, before)  # each pixel of ``after`` came from 3 px to its right
    interior = backward[10:-10, 10:-20]
    assert np.median(interior[..., 0]) == pytest.approx(3.0, abs=0.3)
    assert np.median(np.abs(interior[..., 1])) < 0.3
    moved = warp(before, backward)
    assert np.abs(moved - after)[10:-10, 10:-20].mean() < 0.2 * np.abs(before - after).mean()


def test_consistency_drops_the_background_a_moving_square_uncovers() -> None:
    background = as_array(Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((160, 100)))
    square = as_array(Image.open(EXAMPLES / "coffee.jpg").convert("RGB").resize((40, 40)))

    def frame(x: int) -> np.ndarray:
        picture = background.copy()
        picture[30:70, x : x + 40] = square
        return picture

    before, after = frame(50), frame(58)  # the square moves 8 px right over a still scene
    weights = consistency(flow(before, after), flow(after, before))
    # Behind the square's old left edge: hidden before, so it cannot be followed.
    assert weights[35:65, 50:58].mean() < 0.3
    # The still background and the square itself are followed.
    assert weights[:, :40].mean() > 0.95 and weights[:, 110:].mean() > 0.95
    assert weights[35:65, 62:94].mean() > 0.9


def test_consistency_drops_what_a_pan_brings_into_the_frame() -> None:
    before, after = shifted_pair(4)  # the camera pans right: 4 new columns on the right
    weights = consistency(flow(before, after), flow(after, before))
    assert weights[:, -3:].mean() < 0.1  # from outside the frame: nothing to follow
    assert weights[10:-10, 10:-10].mean() > 0.95


def test_warping_error_is_zero_for_a_still_clip_and_grows_with_flicker() -> None:
    before, after = shifted_pair(2)
    sources = [before, after]
    steady = warping_error(sources, sources)
    noisy = warping_error([before, np.clip(after + 0.1 * np.random.rand(*after.shape), 0, 1)],
                          sources)  # fmt: skip
    assert steady < 0.002 and noisy > 3 * steady
    still = warping_error([before, before], [before, before])
    assert still == pytest.approx(0.0, abs=1e-6)
    assert motion(before, after).weights.shape == before.shape[:2]


def test_the_temporal_loss_counts_only_the_followed_pixels_relative_to_the_target() -> None:
    target = torch.full((1, 3, 4, 4), 0.5)
    weights = torch.zeros((1, 1, 4, 4))
    weights[..., :2] = 1.0  # the left half can be followed
    loss = TemporalLoss(target, weights)
    image = target.clone()
    image[..., 2:] = 1.0  # the right half differs: not counted
    assert loss(image).item() == pytest.approx(0.0)
    image[..., :2] = 0.7  # the left half 0.2 off: 0.04 over half the pixels, / 0.25
    assert loss(image).item() == pytest.approx(0.04 * 0.5 / 0.25, rel=1e-5)
    image.requires_grad_(True)
    loss(image).backward()
    assert image.grad is not None and float(image.grad[..., 2:].abs().sum()) == 0.0


def test_an_mp4_keeps_the_frame_count_rate_and_sound() -> None:
    photo = Image.open(EXAMPLES / "coffee.jpg")
    clip = pan_clip(photo, frames=9, size=(65, 49), fps=25, audio=True)  # odd sides
    info = probe_video(clip, LIMITS)
    assert (info.frames, info.fps, info.audio, info.size) == (9, Fraction(25), True, (64, 48))
    frames = decode_frames(clip)
    again = encode_mp4(frames, Fraction(30000, 1001), audio_from=clip)
    assert video_info(again) == (9, Fraction(30000, 1001), True)
    assert decode_frames(again)[0].size == (64, 48)


def test_an_animated_gif_is_a_video_of_its_frames() -> None:
    frames = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    info = probe_video(buffer.getvalue(), LIMITS)
    assert (info.frames, info.fps, info.container) == (5, Fraction(10), "GIF")
