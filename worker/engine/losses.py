"""The loss terms of Gatys et al. (2016), as small modules holding their targets.

Every term is computed in fp32, whatever precision the backbone ran in: a Gram matrix sums
H·W products, and bf16's 8-bit mantissa would lose most of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = X·Xᵀ / N for features of shape (B, C, H, W), X flattened to C × HW; N = C·H·W.

    Gatys et al. use the raw X·Xᵀ and divide the squared error by 4·C²·(HW)² instead. Dividing
    the Gram itself by C·H·W (as jcjohnson/neural-style does) is the same objective up to a
    constant per layer, but the value no longer grows with the image size or the layer's
    width: one ``style_weight`` then serves every output size, every scale of the
    coarse-to-fine pyramid and every layer, whose Grams come out of the same magnitude.
    """
    batch, channels, height, width = features.shape
    flat = features.float().reshape(batch, channels, height * width)
    # Under autocast a matmul would be cast back down; keep the Gram in fp32.
    with torch.autocast(device_type=flat.device.type, enabled=False):
        gram = torch.bmm(flat, flat.transpose(1, 2))
    return gram / (channels * height * width)


class ContentLoss(nn.Module):
    """Mean squared error between feature maps and fixed target feature maps."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(features.float(), self.target)


class StyleLoss(nn.Module):
    """Mean squared error between the Gram matrix of feature maps and a target Gram.

    ``target_gram`` may be a blend: the weighted sum of several styles' Grams.
    """

    def __init__(self, target_gram: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(gram_matrix(features), self.target)


class TotalVariationLoss(nn.Module):
    """Mean squared difference between neighbouring pixels, down and across.

    Squared (not absolute) differences, as in Mahendran & Vedaldi (2015) with β = 2: smooth
    and cheap, it only discourages the high-frequency noise the optimizer otherwise leaves.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image.float()
        down = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
        across = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
        return down + across


def blend_grams(grams: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·Gᵢ: the target Gram of a blend of styles (weights already sum to 1)."""
    return sum((w * g for g, w in zip(grams, weights, strict=True)), torch.zeros_like(grams[0]))
