"""The loss terms of Gatys et al. (2016), as small modules holding their targets.

Every term is computed in fp32, whatever precision the backbone ran in: a Gram matrix sums
H·W products, and bf16's 8-bit mantissa would lose most of them. Only the gradient a bf16
backbone gets back from a Gram is computed in bf16, the precision it is handed over in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = X·Xᵀ / N for features of shape (B, C, H, W), X flattened to C × HW; N = C·H·W.

    Gatys et al. (2016, eq. 4) take the raw X·Xᵀ and divide the summed squared error by
    4·C²·(HW)². Dividing the Gram by C·H·W (as jcjohnson/neural-style does) and taking the
    mean squared error over its C² entries divides it by C⁴·(HW)² instead: the dependence
    on the image size is the same in both (neither grows with HW), but each layer's term
    is 4/C² times the paper's. :class:`StyleLoss` then divides by the target Gram's own
    mean square, which cancels any constant factor here: the layers' terms are relative
    errors, weighted only by ``style_layer_weights``. N keeps the Gram's entries in fp32's
    comfortable range.
    """
    _, channels, height, width = features.shape
    # Under autocast a matmul would be cast back down; the Gram is computed in fp32.
    with torch.autocast(device_type=features.device.type, enabled=False):
        gram = _Gram.apply(features)
    return gram / (channels * height * width)


class _Gram(torch.autograd.Function):
    """X·Xᵀ in fp32 with X of shape (B, C, H·W), computed in the features' memory layout.

    Autograd's bmm(X, Xᵀ) returns two gradients, one of them transposed, and sums them
    with a strided add; on channels_last features the sum then meets the next layer's
    gradient in another layout. Both adds are a large part of a bf16 step (torch
    profiler). Here the gradient is one matmul, (dG + dGᵀ)·X, laid out like the features.

    For bf16 features that matmul runs in bf16 (fp32 accumulation): its result goes back
    into the bf16 backbone, so it would be rounded to bf16 anyway, and in fp32 it is a large
    share of the Grams' time, several times its cost in bf16. The Gram itself, the loss
    and dG stay fp32; only dG + dGᵀ is rounded to bf16 (fp16's range would not hold it).

    The Gram of bf16 features is an fp32 matmul of values that bf16 holds exactly, so on
    the CPU oneDNN may multiply them in bf16 (AMX) and accumulate in fp32: the products
    are the same, only the order of the sums differs (relative error about 1e-6 against
    the plain fp32 matmul), and with native bf16 instructions the Grams run faster.
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        ctx.shape = features.shape
        ctx.rows = _is_channels_last(features)
        if ctx.rows:  # stored as (B, H·W, C): X transposed, a view without a copy
            rows = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            ctx.save_for_backward(rows)
            rows = rows.float()
            with _bf16_products(features):
                return torch.bmm(rows.transpose(1, 2), rows)
        flat = features.reshape(batch, channels, height * width)
        ctx.save_for_backward(flat)
        flat = flat.float()
        with _bf16_products(features):
            return torch.bmm(flat, flat.transpose(1, 2))

    @staticmethod
    @once_differentiable  # the style loss never needs second derivatives
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (saved,) = ctx.saved_tensors
        batch, channels, height, width = ctx.shape
        compute = torch.bfloat16 if saved.dtype == torch.bfloat16 else torch.float32
        # On the CPU, backward runs on the caller's thread, under the caller's autocast.
        with torch.autocast(device_type=grad.device.type, enabled=False):
            symmetric = (grad + grad.transpose(1, 2)).to(compute)
            if ctx.rows:
                grad_rows = torch.bmm(saved.to(compute), symmetric).to(saved.dtype)
                return grad_rows.view(batch, height, width, channels).permute(0, 3, 1, 2)
            grad_flat = torch.bmm(symmetric, saved.to(compute)).to(saved.dtype)
            return grad_flat.view(batch, channels, height, width)


@contextmanager
def _bf16_products(features: torch.Tensor) -> Iterator[None]:
    """Lets oneDNN run fp32 matmuls with bf16 products while inside, for bf16 ``features``
    on the CPU (where they are exact); elsewhere a no-op. The setting is process-wide, so it
    is restored on the way out."""
    if features.dtype != torch.bfloat16 or features.device.type != "cpu":
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _is_channels_last(features: torch.Tensor) -> bool:
    return features.is_contiguous(memory_format=torch.channels_last) and not (
        features.is_contiguous()
    )


def relative_scale(target: torch.Tensor) -> torch.Tensor:
    """1 / mean(T²): what turns a mean squared error against ``target`` into a relative one.

    Gatys et al. (2016) weigh raw squared errors, whose size follows the backbone's feature
    scale: a network fed 0–255 BGR (the Caffe weights) has features 255 times larger than
    one fed [0, 1], its Grams 255² times, and one set of weights α, β cannot mean the same
    on both, nor on two layers of one network. Divided by the target's own mean square,
    each term is unchanged when a layer's features are multiplied by any factor: α and β
    mean the same on every backbone, layer, size and pyramid scale (docs/engine.md).
    """
    return 1.0 / target.float().square().mean().clamp(min=1e-30)


class ContentLoss(nn.Module):
    """Mean squared error between feature maps and fixed target feature maps, relative to
    the target's mean square (:func:`relative_scale`)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())
        self.register_buffer("scale", relative_scale(self.target))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _MeanSquaredError.apply(features, self.target) * self.scale


class TemporalLoss(nn.Module):
    """Ruder, Dosovitskiy & Brox's short-term temporal loss (GCPR 2016, eq. 7): the mean of
    c·(x − w)² over the pixels, where w is the previous stylized frame warped onto this one
    and c (0 or 1 per pixel) marks where the optical flow can be followed. Relative to w's
    mean square, as the content loss is to its target's (:func:`relative_scale`)."""

    def __init__(self, target: torch.Tensor, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())
        self.register_buffer("weights", weights.detach().float())
        self.register_buffer("scale", relative_scale(self.target))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        squared = (image.float() - self.target).square() * self.weights
        return squared.mean() * self.scale


class _MeanSquaredError(torch.autograd.Function):
    """mean((X - T)²) in fp32, whose gradient keeps the features' memory layout.

    ``F.mse_loss`` (and ``mean`` of a square) hands back a contiguous gradient whatever the
    layout of X. On channels_last features that gradient would then meet the next layer's
    channels_last one in a strided add, and the ReLU and the convolution below would take
    the mixed layout on (torch profiler).
    """

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        difference = features.float() - target  # in the layout of ``features``
        ctx.save_for_backward(difference)
        ctx.dtype = features.dtype
        return difference.square().mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (difference,) = ctx.saved_tensors
        scale = grad * (2.0 / difference.numel())
        return (difference * scale).to(ctx.dtype), None


class StyleLoss(nn.Module):
    """Mean squared error between the Gram matrix of feature maps and a target Gram,
    relative to the target's mean square (:func:`relative_scale`): 0 for a perfect match,
    1 for a Gram of zeros, whatever the layer's feature scale.

    ``target_gram`` may be a blend: the weighted sum of several styles' Grams.
    """

    def __init__(self, target_gram: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target_gram.detach().float())
        self.register_buffer("scale", relative_scale(self.target))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.of_gram(gram_matrix(features), features)

    def of_gram(self, gram: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The loss of features whose Gram matrix is computed already (a batch computes
        them together)."""
        return F.mse_loss(gram, self.target) * self.scale


def channel_means(features: torch.Tensor) -> torch.Tensor:
    """The mean of each channel of (B, C, H, W) features, in fp32: (B, C)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return features.float().mean((-2, -1))


def _covariance(gram: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The channels' covariance from the Gram (X·Xᵀ / C·H·W) and the means."""
    second_moment = gram * gram.shape[-1]  # X·Xᵀ / H·W
    return second_moment - means.unsqueeze(-1) * means.unsqueeze(-2)


class WassersteinStyleLoss(nn.Module):
    """The squared Wasserstein-2 distance between Gaussians fitted to the features and to the
    style's (each channel's mean, and their covariance), relative to the target's own
    second moment: the alternative to the Gram loss of crowsonkb's style-transfer-pytorch
    (``StyleLossW2``). Gatys et al. match Grams, which mix the mean into the covariance.

    W₂² = |μ - μₜ|² + tr(Σ + Σₜ - 2 (Σₜ^½ Σ Σₜ^½)^½); the trace of the square root is the
    sum of the square roots of the eigenvalues (``eigvalsh``, fp32), where crowsonkb runs
    Newton-Schulz iterations. A blend of styles blends their means and Grams (second raw
    moments), which mix linearly where covariances do not.
    """

    def __init__(self, target_gram: torch.Tensor, target_means: torch.Tensor) -> None:
        super().__init__()
        covariance = _covariance(target_gram.detach().float(), target_means.detach().float())
        covariance = covariance.squeeze(0)
        channels = covariance.shape[-1]
        # A small ridge keeps the square roots' gradients finite on flat directions.
        self.eps = 1e-5 * float(covariance.diagonal().mean().clamp(min=1e-12))
        ridge = self.eps * torch.eye(channels, device=covariance.device)
        self.register_buffer("ridge", ridge)
        values, vectors = torch.linalg.eigh(covariance + ridge)
        root = vectors @ torch.diag_embed(values.clamp(min=0).sqrt()) @ vectors.transpose(-1, -2)
        self.register_buffer("means", target_means.detach().float().squeeze(0))
        self.register_buffer("covariance", covariance + ridge)
        self.register_buffer("root", root)
        second_moment = self.means.square().mean() + self.covariance.diagonal().mean()
        self.register_buffer("scale", 1.0 / second_moment.clamp(min=1e-30))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.of_gram(gram_matrix(features), features)

    def of_gram(self, gram: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        means = channel_means(features)
        with torch.autocast(device_type=gram.device.type, enabled=False):
            channels = gram.shape[-1]
            covariance = _covariance(gram.float(), means) + self.ridge
            product = self.root @ covariance @ self.root
            product = (product + product.transpose(-1, -2)) / 2  # symmetric to rounding
            root_trace = torch.linalg.eigvalsh(product).clamp(min=self.eps).sqrt().sum(-1)
            traces = self.covariance.diagonal().sum() + covariance.diagonal(0, -2, -1).sum(-1)
            spread = (traces - 2 * root_trace) / channels
            distance = (means - self.means).square().mean(-1) + spread
            return distance.mean() * self.scale


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
    """Σ wᵢ·Gᵢ: the target Gram (or channel means) of a blend of styles (weights already
    sum to 1)."""
    return sum((w * g for g, w in zip(grams, weights, strict=True)), torch.zeros_like(grams[0]))
