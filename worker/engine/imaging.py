"""Conversions between Pillow images and (1, 3, H, W) float tensors in [0, 1], and colour."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.pyramid import scaled_size

# RGB → YIQ (NTSC 1953). Y carries luminance, I and Q the chroma; Gatys et al. (2016,
# "Preserving color in neural artistic style transfer") use it for luminance-only transfer.
RGB_TO_YIQ = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ]
)
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)


def to_tensor(image: Image.Image, *, long_side: int, device: torch.device) -> torch.Tensor:
    """``image`` resized (Lanczos) to ``long_side`` as a (1, 3, H, W) fp32 tensor in [0, 1]."""
    resized = image.convert("RGB").resize(
        scaled_size(*image.size, long_side), Image.Resampling.LANCZOS
    )
    array = np.asarray(resized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A (1, 3, H, W) tensor as an 8-bit RGB image, clamped to [0, 1]."""
    array = tensor.detach()[0].float().clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def resize_to(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a (1, 3, H, W) tensor: how a pyramid scale seeds the next one."""
    return F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)


def rgb_to_yiq(tensor: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", RGB_TO_YIQ.to(tensor.device), tensor.float())


def yiq_to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", YIQ_TO_RGB.to(tensor.device), tensor.float())


def keep_original_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The luminance (Y) of ``stylized`` with the chroma (I, Q) of ``content``."""
    if content.shape[-2:] != stylized.shape[-2:]:
        content = resize_to(content, *stylized.shape[-2:])
    luminance = rgb_to_yiq(stylized)[:, :1]
    chroma = rgb_to_yiq(content)[:, 1:]
    return yiq_to_rgb(torch.cat([luminance, chroma], dim=1)).clamp(0, 1)


def match_luminance(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """``style`` with its luminance (Y) shifted and scaled to the mean and standard deviation
    of ``content``'s, its chroma kept: Gatys et al. (2017, "Controlling perceptual factors
    in neural style transfer", §5.1) match the luminance histograms this way before a
    luminance-only transfer, so that a dark painting does not darken a bright photo."""
    yiq = rgb_to_yiq(style)
    content_y = rgb_to_yiq(content)[:, :1]
    style_y = yiq[:, :1]
    scale = content_y.std() / style_y.std().clamp(min=1e-6)
    matched = (style_y - style_y.mean()) * scale + content_y.mean()
    return yiq_to_rgb(torch.cat([matched, yiq[:, 1:]], dim=1)).clamp(0, 1)
