"""The objective of Gatys et al. at one pyramid scale, and its evaluation for a batch of
runs in one pass through the backbone."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from shared.options import RunOptions
from worker.engine.backbones import FeatureExtractor
from worker.engine.device import loss_scale, scaled_backward
from worker.engine.losses import (
    ContentLoss,
    StyleLoss,
    TemporalLoss,
    TotalVariationLoss,
    WassersteinStyleLoss,
    blend_grams,
    channel_means,
    gram_matrix,
)


@dataclass
class Objective:
    """The loss terms of one pyramid scale, with their targets computed once."""

    extractor: FeatureExtractor
    content_losses: dict[str, ContentLoss]
    style_losses: dict[str, tuple[float, StyleLoss | WassersteinStyleLoss]]
    tv_loss: TotalVariationLoss
    weights: torch.Tensor  # (content, style, tv, temporal)
    autocast_dtype: torch.dtype | None
    channels_last: bool
    #: A video frame's temporal loss (Ruder et al.), None for a photo.
    temporal_loss: TemporalLoss | None = None

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.content_losses, *self.style_losses]))

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def features(self, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with self.autocast(image.device):
            return self.extractor(image, layers)

    def grams(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Gram matrices of the style layers, one per image of the batch."""
        return {name: gram_matrix(features[name]) for name in self.style_losses}

    def parts(self, image: torch.Tensor) -> torch.Tensor:
        """Weighted (content, style, tv, temporal) as one fp32 tensor: one sync to read."""
        features = self.features(image, self.layers)
        return self.parts_from(features, self.grams(features), image)

    def parts_from(
        self, features: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], image: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`parts` from ``image``'s features and Grams, computed already."""
        zero = image.new_zeros((), dtype=torch.float32)
        content = sum((loss(features[name]) for name, loss in self.content_losses.items()), zero)
        style = sum(
            (
                w * loss.of_gram(grams[name], features[name])
                for name, (w, loss) in self.style_losses.items()
            ),
            zero,
        )
        temporal = zero if self.temporal_loss is None else self.temporal_loss(image)
        unweighted = torch.stack([content, style, self.tv_loss(image), temporal])
        return unweighted * self.weights


def build_objective(
    extractor: FeatureExtractor,
    options: RunOptions,
    style_weights: Sequence[float],
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> Objective:
    objective = Objective(
        extractor=extractor,
        content_losses={},
        style_losses={},
        tv_loss=TotalVariationLoss(),
        weights=torch.tensor(
            [
                options.content_weight,
                options.style_weight,
                options.tv_weight,
                options.temporal_weight,
            ],
            device=content.device,
        ),
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
    )
    with torch.no_grad():
        content_features = objective.features(content, options.content_layers)
        objective.content_losses = {
            name: ContentLoss(content_features[name]) for name in options.content_layers
        }
        wasserstein = options.style_loss == "wasserstein"
        style_grams, style_means = [], []
        for style in styles:
            features = objective.features(style, options.style_layers)
            style_grams.append({name: gram_matrix(value) for name, value in features.items()})
            if wasserstein:
                style_means.append({name: channel_means(v) for name, v in features.items()})
        weights = list(style_weights)

        def style_loss(name: str) -> StyleLoss | WassersteinStyleLoss:
            gram = blend_grams([grams[name] for grams in style_grams], weights)
            if wasserstein:
                means = blend_grams([each[name] for each in style_means], weights)
                return WassersteinStyleLoss(gram, means)
            return StyleLoss(gram)

        objective.style_losses = {
            name: (layer_weight, style_loss(name))
            for name, layer_weight in zip(
                options.style_layers, options.style_layer_weights, strict=True
            )
        }
    return objective


def evaluate(objectives: list[Objective], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each run's weighted (content, style, tv, temporal) at its current image, from one
    pass through the backbone; leaves each image's gradient in its ``grad``."""
    for param in params:
        param.grad = None
    # The layers and the extractor are the same for every run of a batch (its batch key).
    features = objectives[0].features(
        params[0] if len(params) == 1 else torch.cat(params), objectives[0].layers
    )
    grams = objectives[0].grams(features)
    if len(params) == 1:  # no slices: a slice's gradient is a copy of the whole feature map
        parts = [objectives[0].parts_from(features, grams, params[0])]
    else:
        # split, not one slice per run: its gradient is put together in one copy.
        per_run_features = {name: feature.split(1) for name, feature in features.items()}
        per_run_grams = {name: gram.split(1) for name, gram in grams.items()}
        parts = [
            objective.parts_from(
                {name: feature[index] for name, feature in per_run_features.items()},
                {name: gram[index] for name, gram in per_run_grams.items()},
                param,
            )
            for index, (objective, param) in enumerate(zip(objectives, params, strict=True))
        ]
    # Scaled for fp16 (its gradients would underflow), unscaled before any optimizer reads
    # them; the parts returned (the losses reported) are never scaled.
    scale = loss_scale(objectives[0].autocast_dtype)
    scaled_backward(torch.stack(parts).sum(), params, scale)
    return [run_parts.detach() for run_parts in parts]
