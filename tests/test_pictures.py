"""The defaults make pictures people keep: on every shipped photo × every preset painting,
on the default backbone's real ImageNet features, the scene stays and the painting shows,
by measures the run did not optimize (bench/quality.py; the pass marks are
bench/contact_sheet.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bench.contact_sheet import PASS, PHOTOS
from bench.quality import scores
from shared.presets import presets
from worker.engine import prepare, stylize_together

REPO = Path(__file__).resolve().parents[1]
#: The rocket's scene measure is low for every stylized picture of it (thin towers on a
#: dark sky): 0.33 to 0.61 over every variant bench/tune.py tried at 256 px, the paper's
#: defaults included. Its pictures must keep that much.
SCENE_MARKS = {"rocket": 0.3}


def thumbnail(path: Path, side: int) -> Image.Image:
    image = Image.open(path).convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_the_defaults_keep_the_scene_and_carry_every_preset(photo: str) -> None:
    # Smaller and shorter than the defaults' 512 px and 300 iterations, to fit the suite;
    # every other option is the default, the backbone included (vgg16-caffe's weights
    # come with the worker's install).
    # The paintings run as one batch: each picture is the one it would be alone (their
    # losses share no term), in less time (bench/batching.py).
    content = thumbnail(PHOTOS[photo], 256)
    paintings = {name: thumbnail(preset.path, 256) for name, preset in presets().items()}
    runs = [
        prepare(content=content, styles=[painting], size=128, iterations=30, seed=0, device="cpu")
        for painting in paintings.values()
    ]
    results = stylize_together(runs)
    marks = {**PASS, "scene": SCENE_MARKS.get(photo, PASS["scene"])}
    failed = {}
    for (name, painting), result in zip(paintings.items(), results, strict=True):
        assert not isinstance(result, Exception), result
        score = scores(result.image, content, painting)
        if any(score[measure] < mark for measure, mark in marks.items()):
            failed[name] = score
    assert not failed, failed


def test_the_measures_tell_a_photo_from_a_texture() -> None:
    # The scores must be able to fail: the photo itself scores no style, a texture of the
    # painting (resized to the photo's shape, upside down) no scene.
    photo = thumbnail(PHOTOS["chelsea"], 128)
    painting = thumbnail(presets()["starry-night"].path, 128)
    itself = scores(photo, photo, painting)
    assert itself["scene"] > 0.99 and abs(itself["style"]) < 1e-6
    texture = painting.resize(photo.size).transpose(Image.Transpose.ROTATE_180)
    assert scores(texture, photo, painting)["scene"] < PASS["scene"]
