"""The backbones by name: architecture, layer names and where their weights come from.

Light (no torch), so the command line, the web form and the option checks can list the
backbones and their layers without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

#: How a backbone wants its input. "torchvision": RGB in [0, 1] normalized with ImageNet's
#: mean and std. "caffe": BGR in 0–255 minus the mean pixel, as the Caffe-trained VGG nets.
Preprocessing = Literal["torchvision", "caffe"]

# torchvision's VGG configurations: output channels per 3×3 conv, "M" for a 2×2 pooling.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    config: tuple[int | str, ...]
    description: str
    #: File name of the ImageNet weights in torchvision's format; None for a seeded backbone.
    weights_file: str | None = None
    weights_url: str | None = None
    #: Expected SHA-256 of the weights file: torchvision publishes its leading hex digits in
    #: the file name (the torch.hub convention, checked the same way as ``check_hash``).
    sha256_prefix: str | None = None
    #: Seed of the filters for a backbone that needs no download.
    seed: int | None = None
    #: The input the weights were trained on; the feature extractor converts RGB in [0, 1].
    preprocessing: Preprocessing = "torchvision"

    @property
    def needs_weights(self) -> bool:
        return self.weights_file is not None

    @cached_property
    def layer_names(self) -> tuple[str, ...]:
        """Module names in torchvision's ``features`` order: conv1_1, relu1_1, ..., pool1."""
        names: list[str] = []
        block, index = 1, 1
        for item in self.config:
            if item == "M":
                names.append(f"pool{block}")
                block, index = block + 1, 1
            else:
                names += [f"conv{block}_{index}", f"relu{block}_{index}"]
                index += 1
        return tuple(names)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg19",
            config=VGG19_CONFIG,
            description="VGG19, torchvision's ImageNet weights (the network of Gatys et al.)",
            weights_file="vgg19-dcbb9e9d.pth",
            weights_url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
            sha256_prefix="dcbb9e9d",
        ),
        BackboneSpec(
            name="vgg19-caffe",
            config=VGG19_CONFIG,
            description=(
                "VGG19, the Caffe-converted ImageNet weights of neural-style (Johnson's, as "
                "in neural-style-pt): more vivid colours"
            ),
            weights_file="vgg19-d01eb7cb.pth",
            weights_url="https://web.eecs.umich.edu/~justincj/models/vgg19-d01eb7cb.pth",
            sha256_prefix="d01eb7cb",
            preprocessing="caffe",
        ),
        BackboneSpec(
            name="vgg16",
            config=VGG16_CONFIG,
            description="VGG16, torchvision's ImageNet weights",
            weights_file="vgg16-397923af.pth",
            weights_url="https://download.pytorch.org/models/vgg16-397923af.pth",
            sha256_prefix="397923af",
        ),
        BackboneSpec(
            name="vgg19-random",
            config=VGG19_CONFIG,
            description=(
                "VGG19 architecture with seeded random filters: no download, visibly lower "
                "quality; for offline machines and tests"
            ),
            seed=19,
        ),
    )
}

DEFAULT_BACKBONE = "vgg19"
OFFLINE_BACKBONE = "vgg19-random"
