"""Convolution + ReLU in bf16 on the CPU, through oneDNN, with weights packed once.

``conv2d`` hands oneDNN the weights in torch's layout, and oneDNN reorders them into its
blocked layout at every call, forward and backward, a sizeable part of a bf16 loss
evaluation (``ONEDNN_VERBOSE`` lists the reorders). Here each convolution's
weights are packed once per input shape: for the forward, with the ReLU fused into it (one
pass over the output instead of two), and transposed, for the gradient with respect to the
input. The outputs and gradients are those of ``relu(conv2d(x))`` (tests/test_engine.py
compares the two).

The ops are ``torch.ops.mkldnn``'s ``_convolution_pointwise`` and
``_convolution_transpose_pointwise``, which inductor's CPU backend emits for frozen
convolutions. Where a torch build lacks them, or the CPU has no bf16 in oneDNN, the
feature extractor keeps to ``conv2d`` and ``relu``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

#: The torch.ops.mkldnn ops this module calls.
PACKED_OPS = (
    "_reorder_convolution_weight",
    "_reorder_convolution_transpose_weight",
    "_convolution_pointwise",
    "_convolution_transpose_pointwise",
    "_is_mkldnn_bf16_supported",
)


@functools.cache
def packed_convolutions_available() -> bool:
    ops = torch.ops.mkldnn
    try:
        for name in PACKED_OPS:
            getattr(ops, name)  # an op this torch build lacks raises here
        return torch.backends.mkldnn.is_available() and bool(ops._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def can_pack(conv: nn.Module) -> bool:
    """A convolution whose gradient is the transposed convolution with the same padding:
    2-D, stride 1, no groups, zero padding that keeps the size (VGG's 3×3 with padding 1).

    Or replicate padding of that size (the first convolution's): the input is padded first,
    outside the packed op, which then convolves without padding; autograd sums the padding's
    gradient back onto the edge pixels.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(conv.padding, tuple):
        return False
    keeps_size = all(
        2 * pad == dilation * (kernel - 1)
        for pad, dilation, kernel in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True)
    )
    return (
        conv.stride == (1, 1)
        and conv.groups == 1
        and conv.padding_mode in ("zeros", "replicate")
        and keeps_size
    )


class PackedConvReLU:
    """``relu(conv(x))`` for channels_last ``x`` in bf16, packed for the latest input shape.

    ``x`` is cast to bf16 here, after any replicate padding, as autocast casts it for
    ``conv2d`` after ``nn.Conv2d`` has padded it: the same numbers, gradients included.

    A pyramid's scales change the shape, and oneDNN picks its blocked layout by shape, so
    the packs are redone when it changes: once a scale, not at every call.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        assert can_pack(conv), conv
        self.conv = conv
        # The padding oneDNN applies: none where the input is padded beforehand.
        self.zero_padding = list(conv.padding) if conv.padding_mode == "zeros" else [0, 0]
        self.input_shape: torch.Size | None = None
        self.forward_weight: torch.Tensor | None = None
        self.input_gradient_weight: torch.Tensor | None = None

    def _pack(self, shape: torch.Size) -> None:
        conv = self.conv
        output_shape = [shape[0], conv.out_channels, shape[2], shape[3]]  # keeps the size
        padding, stride, dilation = self.zero_padding, [1, 1], list(conv.dilation)
        pad_h, pad_w = (p - z for p, z in zip(conv.padding, padding, strict=True))
        padded_shape = [shape[0], shape[1], shape[2] + 2 * pad_h, shape[3] + 2 * pad_w]
        mkldnn = torch.ops.mkldnn
        self.forward_weight = mkldnn._reorder_convolution_weight(
            conv.weight, padding, stride, dilation, 1, padded_shape
        )
        # The gradient of a stride-1 convolution with respect to its input is the transposed
        # convolution of the output's gradient with the same weights (no output padding).
        self.input_gradient_weight = mkldnn._reorder_convolution_transpose_weight(
            conv.weight, padding, [0, 0], stride, dilation, 1, output_shape
        )
        self.input_shape = shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.input_shape:
            self._pack(x.shape)
        conv = self.conv
        if conv.padding_mode != "zeros":
            pad_h, pad_w = conv.padding
            x = F.pad(x, [pad_w, pad_w, pad_h, pad_h], mode=conv.padding_mode)
            x = x.contiguous(memory_format=torch.channels_last)
        return _ConvReLU.apply(x.to(torch.bfloat16), self)


class _ConvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: PackedConvReLU) -> torch.Tensor:
        conv = packed.conv
        output = torch.ops.mkldnn._convolution_pointwise(
            x, packed.forward_weight, conv.bias, packed.zero_padding, [1, 1],
            list(conv.dilation), 1, "relu", [], "",
        )  # fmt: skip
        # The packs of this shape, even if another shape is packed before the backward.
        ctx.conv, ctx.padding = conv, packed.zero_padding
        ctx.input_gradient_weight = packed.input_gradient_weight
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @once_differentiable  # the losses never need second derivatives
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (output,) = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, output, 0)
        grad_input = torch.ops.mkldnn._convolution_transpose_pointwise(
            grad, ctx.input_gradient_weight, None, ctx.padding, [0, 0], [1, 1],
            list(ctx.conv.dilation), 1, "none", [], "",
        )  # fmt: skip
        return grad_input, None
