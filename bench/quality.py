"""Measures of a stylized picture that the run did not optimize: does it keep the scene, and
does it carry the painting?

- **scene**: SSIM (Wang et al., 2004) of the luminance of the result and the photo, both
  blurred and shrunk to a quarter of the output's long side, so that it compares the
  layout of the scene (edges of houses, a cat's outline) and not the brush texture laid
  over it. 1: the same structure; a texture with no scene left scores near 0.
- **style**: how much of the way from the photo to the painting the result went, in Gram
  statistics of a network the run never saw (VGG16's architecture with seeded filters of
  another seed than the offline backbone's): 1 - D(result)/D(photo), D the mean relative
  Gram error against the painting over four layers. 0: no more the painting's than the
  photo; 1: its texture statistics matched.
- **colour**: the same for the mean and covariance of the pixels' RGB: 1 - d(result)/d(photo).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.backbones import BACKBONES
from worker.engine.backbones import IMAGENET_MEAN, IMAGENET_STD, build_layers, seed_filters
from worker.engine.imaging import rgb_to_yiq, to_tensor

#: The held-out network's seed (the offline backbone's is 19) and layers.
HELD_OUT_SEED = 7
HELD_OUT_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")


def _tensor(image: Image.Image, long_side: int | None = None) -> torch.Tensor:
    return to_tensor(image, long_side=long_side or max(image.size), device=torch.device("cpu"))


def _luminance(x: torch.Tensor) -> torch.Tensor:
    return rgb_to_yiq(x)[:, :1]


def _gaussian(sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    return (kernel[:, None] * kernel[None, :]).view(1, 1, 2 * radius + 1, 2 * radius + 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = _gaussian(sigma)
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), kernel)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two (1, 1, H, W) images in [0, 1], Gaussian window σ = 1.5."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _blur(a, 1.5), _blur(b, 1.5)
    var_a = _blur(a * a, 1.5) - mu_a**2
    var_b = _blur(b * b, 1.5) - mu_b**2
    cov = _blur(a * b, 1.5) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(index.mean())


def scene_score(result: Image.Image, photo: Image.Image) -> float:
    side = max(16, max(result.size) // 4)
    a = _tensor(result)
    b = _tensor(photo, max(result.size))
    b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
    shrink = [F.interpolate(_blur(_luminance(x), 2.0), scale_factor=side / max(result.size),
                            mode="area") for x in (a, b)]  # fmt: skip
    return ssim(*shrink)


@functools.cache
def _held_out() -> torch.nn.Sequential:
    layers = build_layers(BACKBONES["vgg16"], "max")
    # Zero padding throughout, whatever the engine's first layer does: the measure must not
    # move when the engine changes.
    for module in layers:
        if isinstance(module, torch.nn.Conv2d):
            module.padding_mode = "zeros"
    seed_filters(layers, HELD_OUT_SEED)
    return layers.eval().requires_grad_(False)


def _grams(image: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (image - mean) / std
    grams = {}
    with torch.no_grad():
        for name, module in _held_out().named_children():
            x = module(x)
            if name in HELD_OUT_LAYERS:
                flat = x.flatten(2)
                grams[name] = flat @ flat.transpose(1, 2) / flat.shape[-1]
                if len(grams) == len(HELD_OUT_LAYERS):
                    break
    return grams


def _gram_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(np.mean([float((a[k] - b[k]).square().mean() / b[k].square().mean()) for k in b]))


def style_score(result: Image.Image, photo: Image.Image, painting: Image.Image) -> float:
    side = max(result.size)
    target = _grams(_tensor(painting, side))
    before = _gram_distance(_grams(_tensor(photo, side)), target)
    after = _gram_distance(_grams(_tensor(result)), target)
    return 1.0 - after / before


def _colour_stats(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    return pixels.mean(0), np.cov(pixels, rowvar=False)


def colour_score(result: Image.Image, photo: Image.Image, painting: Image.Image) -> float:
    target_mean, target_cov = _colour_stats(painting)

    def distance(image: Image.Image) -> float:
        mean, cov = _colour_stats(image)
        return float(np.linalg.norm(mean - target_mean) + np.linalg.norm(cov - target_cov))

    return 1.0 - distance(result) / distance(photo)


def scores(result: Image.Image, photo: Image.Image, painting: Image.Image) -> dict[str, float]:
    return {
        "scene": scene_score(result, photo),
        "style": style_score(result, photo, painting),
        "colour": colour_score(result, photo, painting),
    }
