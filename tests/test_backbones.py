"""The feature extractor's layers and input conversion, on seeded filters (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shared.backbones import BACKBONES
from worker.engine.backbones import FeatureExtractor, build_layers, seed_filters
from worker.engine.packed import PackedConvReLU, can_pack, packed_convolutions_available


def _seeded(name: str, seed: int = 3) -> FeatureExtractor:
    spec = BACKBONES[name]
    layers = build_layers(spec, "max")
    seed_filters(layers, seed)  # zero biases
    return FeatureExtractor(spec, layers)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_only_the_first_convolution_replicates_the_edges(name: str) -> None:
    convs = [m for m in build_layers(BACKBONES[name], "max") if isinstance(m, nn.Conv2d)]
    assert convs[0].padding_mode == "replicate" and convs[0].padding == (1, 1)
    assert all(conv.padding_mode == "zeros" for conv in convs[1:])
    assert all(can_pack(conv) for conv in convs)


@pytest.mark.parametrize("name", ["vgg19-random", "vgg19-caffe"])
def test_a_constant_image_has_constant_first_features_up_to_the_border(name: str) -> None:
    # With zero padding the border pixels of relu1_1 would see zeros (a frame); replicated,
    # every 3×3 window of a constant image is the same.
    extractor = _seeded(name)
    image = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 17, 23)
    with torch.no_grad():
        relu1_1 = extractor(image, ["relu1_1"])["relu1_1"]
    assert relu1_1.abs().amax() > 0
    torch.testing.assert_close(relu1_1, relu1_1[..., 8:9, 11:12].expand_as(relu1_1))

    zero_padded = nn.Conv2d(3, 64, 3, padding=1)
    zero_padded.load_state_dict(extractor.layers.conv1_1.state_dict())
    with torch.no_grad():
        framed = F.relu(zero_padded((image - extractor.mean) / extractor.std))
    assert not torch.allclose(framed[..., 0, :], framed[..., 8, :])  # the test can tell


def test_torchvision_backbones_keep_imagenet_normalization() -> None:
    extractor = _seeded("vgg19")
    torch.manual_seed(0)
    image = torch.rand(1, 3, 12, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv = extractor.layers.conv1_1
    x = F.pad((image - mean) / std, [1, 1, 1, 1], mode="replicate")
    expected = F.relu(F.conv2d(x, conv.weight, conv.bias))
    for view in (extractor, extractor.truncated("relu1_1")):
        with torch.no_grad():
            torch.testing.assert_close(view(image, ["relu1_1"])["relu1_1"], expected)


@pytest.mark.skipif(
    not packed_convolutions_available(), reason="this torch build or CPU lacks oneDNN bf16"
)
def test_a_packed_replicate_padded_convolution_matches_conv2d_bit_for_bit() -> None:
    conv = nn.Conv2d(3, 16, 3, padding=1, padding_mode="replicate").to(torch.bfloat16)
    conv.requires_grad_(False)
    packed = PackedConvReLU(conv)

    def run(apply: object, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(height)
        image = torch.randn(2, 3, height, width).contiguous(memory_format=torch.channels_last)
        image.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = apply(image)  # type: ignore[operator]
        output.float().square().sum().backward()
        assert image.grad is not None
        return output.detach(), image.grad

    for height, width in ((9, 14), (20, 11)):
        mine = run(packed, height, width)
        plain = run(lambda x: F.relu(conv(x)), height, width)
        assert mine[0].shape == (2, 16, height, width)
        for got, expected in zip(mine, plain, strict=True):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
