"""The feature extractors: VGG networks built from the registry, loaded once per process."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from shared.backbones import BACKBONES, BackboneSpec
from shared.errors import OptionError, WeightsError
from worker.engine.packed import PackedConvReLU, can_pack, packed_convolutions_available
from worker.engine.weights import WeightsLocations, load_feature_state_dict, packaged_file

Pooling = Literal["max", "avg"]

# torchvision's ImageNet statistics: its backbones expect inputs normalized with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe's VGG nets take BGR in 0-255 minus the mean pixel (B, G, R), and no std.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def input_normalization(
    spec: BackboneSpec,
) -> tuple[bool, tuple[float, ...], tuple[float, ...]]:
    """How ``spec`` turns RGB in [0, 1] into its input: (flip to BGR, mean, std), applied
    as ``(flip(x) - mean) / std``. For Caffe, ``(x - m / 255) / (1 / 255) = 255 x - m``."""
    if spec.preprocessing == "caffe":
        return True, tuple(m / 255 for m in CAFFE_MEAN_BGR), (1 / 255,) * 3
    return False, IMAGENET_MEAN, IMAGENET_STD


class FeatureExtractor(nn.Module):
    """A VGG ``features`` stack whose forward returns the activations of named layers.

    Takes RGB images in [0, 1] and converts them itself to the input the weights were
    trained on (``spec.preprocessing``): normalized with ImageNet's mean and std for
    torchvision's, BGR in 0-255 minus the mean pixel for Caffe's. Frozen and in eval mode:
    only the input image receives gradients.
    """

    def __init__(self, spec: BackboneSpec, layers: nn.Sequential) -> None:
        super().__init__()
        self.spec = spec
        self.layers = layers
        self.bgr, mean, std = input_normalization(spec)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()
        children = list(layers.named_children())
        # Convolutions directly followed by a ReLU: under bf16 autocast on the CPU, each
        # pair runs as one oneDNN call with packed weights (worker/engine/packed.py).
        self.packable = {
            name: children[index + 1][0]
            for index, (name, module) in enumerate(children[:-1])
            if can_pack(module) and isinstance(children[index + 1][1], nn.ReLU)
        }
        self.packs: dict[str, PackedConvReLU] = {}

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.layers.named_children())

    def truncated(self, last_layer: str) -> FeatureExtractor:
        """A view that stops after ``last_layer``: the layers after it are never run.

        Shares parameters with ``self``, so truncating costs no memory.
        """
        names = self.layer_names
        if last_layer not in names:
            raise OptionError(f"{self.spec.name} has no layer {last_layer!r}", field="layers")
        keep = names.index(last_layer) + 1
        children = OrderedDict(list(self.layers.named_children())[:keep])
        view = FeatureExtractor(self.spec, nn.Sequential(children))
        view.mean, view.std = self.mean, self.std
        return view

    def forward(self, image: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        wanted = set(layers)
        features: dict[str, torch.Tensor] = {}
        if self.bgr:
            image = image.flip(1)  # RGB to BGR; keeps channels_last
        x = (image - self.mean) / self.std
        packed = self._runs_packed(x)
        fused_relu = None  # the ReLU the previous convolution already applied
        for name, module in self.layers.named_children():
            if name == fused_relu:
                pass
            elif packed and name in self.packable and name not in wanted:
                x = self._packed(name, module)(x)  # casts to bf16 (after any padding)
                fused_relu = self.packable[name]
            else:
                x = module(x)
            if name in wanted:
                features[name] = x
                if len(features) == len(wanted):
                    break
        return features

    def _runs_packed(self, x: torch.Tensor) -> bool:
        """Whether this pass runs its conv + ReLU pairs packed: bf16 autocast on the CPU,
        bf16 weights, channels_last input, and torch's oneDNN ops present."""
        return (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and next(self.layers.parameters()).dtype == torch.bfloat16
            and x.is_contiguous(memory_format=torch.channels_last)
            and packed_convolutions_available()
        )

    def _packed(self, name: str, conv: nn.Module) -> PackedConvReLU:
        if name not in self.packs:
            assert isinstance(conv, nn.Conv2d)
            self.packs[name] = PackedConvReLU(conv)
        return self.packs[name]


def build_layers(spec: BackboneSpec, pooling: Pooling) -> nn.Sequential:
    """The untrained layers of ``spec``, named like ``conv1_1``, ``relu1_1``, ``pool1``.

    The first convolution pads by replicating the image's edge pixels (as crowsonkb's
    style-transfer-pytorch does), not with zeros: a zero border is a frame the features see
    at every edge, and the style loss paints it into the image. The deeper convolutions keep
    the zero padding they were trained with.
    """
    modules: list[nn.Module] = []
    channels = 3
    for item in spec.config:
        if item == "M":
            pool = nn.MaxPool2d if pooling == "max" else nn.AvgPool2d
            modules.append(pool(kernel_size=2, stride=2))
        else:
            assert isinstance(item, int)
            padding_mode = "replicate" if not modules else "zeros"
            conv = nn.Conv2d(channels, item, kernel_size=3, padding=1, padding_mode=padding_mode)
            # Not in place: a captured relu output must survive the next layer.
            modules += [conv, nn.ReLU()]
            channels = item
    return nn.Sequential(OrderedDict(zip(spec.layer_names, modules, strict=True)))


def seed_filters(layers: nn.Sequential, seed: int) -> None:
    """Draw every filter from N(0, 2/fan_in) with a fixed seed (He et al., 2015).

    That variance keeps the second moment of the activations constant through a ReLU
    network, so the deep layers neither vanish nor explode and the default loss weights stay
    usable; biases are zero.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in layers:
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            with torch.no_grad():
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                module.bias.zero_()


def load_weights(layers: nn.Sequential, spec: BackboneSpec, locations: WeightsLocations) -> None:
    state = load_feature_state_dict(spec, locations)
    # torchvision numbers the modules of ``features``; ours are named. Same order.
    indexed = {str(i): name for i, name in enumerate(spec.layer_names)}
    renamed = {}
    for key, value in state.items():
        index, _, param = key.partition(".")
        if index not in indexed:
            raise WeightsError(f"unexpected key features.{key} for {spec.name}", field="backbone")
        renamed[f"{indexed[index]}.{param}"] = value
    expected = layers.state_dict()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise WeightsError(
            f"the {spec.name} weights lack {len(missing)} tensors (first: {missing[0]})",
            field="backbone",
        )
    for key, value in renamed.items():
        if key in expected and value.shape != expected[key].shape:
            raise WeightsError(
                f"{spec.name} tensor {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}",
                field="backbone",
            )
    layers.load_state_dict({k: v for k, v in renamed.items() if k in expected})


_cache: dict[tuple[str, str | None, str, str, str, bool], FeatureExtractor] = {}
_cache_lock = threading.Lock()


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise OptionError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}", field="backbone"
        ) from None


def load_backbone(
    name: str,
    *,
    device: torch.device,
    pooling: Pooling = "max",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    locations: WeightsLocations | None = None,
) -> FeatureExtractor:
    """The frozen feature extractor ``name`` on ``device``, built once per process.

    Cached by name, weights file, pooling, device, dtype and memory format. ``dtype`` is the
    precision the layers' weights are stored in: pass autocast's dtype when running under
    autocast. Autocast keeps a cast copy only of weights that require grad; a frozen
    backbone's fp32 weights would be cast again at every forward pass (a copy of all 20 M
    weights per step, per the torch profiler). Stored already cast, they give the same
    numbers without the copies. Raises :class:`WeightsError` when weights are missing or
    fail their checksum.
    """
    spec = get_spec(name)
    if pooling not in ("max", "avg"):
        raise OptionError(f"pooling must be 'max' or 'avg', not {pooling!r}", field="pooling")
    locations = locations or WeightsLocations.from_env()
    weights_path: Path | None = locations.find(spec) if spec.needs_weights else None
    if weights_path is not None and weights_path == packaged_file(spec):
        # Read from the package's file, converted into these locations: another weights
        # directory converts (and is read) anew.
        weights_path = locations.converted(spec)
    key = (name, str(weights_path), pooling, str(device), str(dtype), channels_last)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        layers = build_layers(spec, pooling)
        if spec.needs_weights:
            load_weights(layers, spec, locations)
        else:
            assert spec.seed is not None
            seed_filters(layers, spec.seed)
        extractor = FeatureExtractor(spec, layers.to(dtype)).to(device)  # mean, std: fp32
        if channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        _cache[key] = extractor
        return extractor
