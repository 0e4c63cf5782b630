"""Where and how precisely the engine runs: the device, the precision, fp16's loss
scaling, and the backbone as it runs there."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from shared.errors import OptionError
from worker.engine.backbones import FeatureExtractor, Pooling, load_backbone

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: What an fp16 run multiplies its loss by before backward (and its image's gradient by the
#: inverse after), at most. Under fp16 autocast the backbone's gradients are fp16, whose
#: smallest normal number is 6e-5: the content term's gradient, 2(X - T)/(N·mean T²) with N
#: the features of its layer, is subnormal all through the backbone already at 128 px
#: (vgg19-random, weight 1). In a content-only run at 64 px weighted 2⁻⁸ (as if N were that
#: of 1024 px) the image's gradient was 34 % off fp32's, weighted 2⁻¹² all zeros; scaled,
#: 6 % off (fp16's rounding) at every weight. A power of two, so the scaling and unscaling
#: are exact. bf16 has fp32's range and runs unscaled.
FP16_LOSS_SCALE = 2.0**12
#: The most the scaled loss may be: for larger losses the factor is cut by powers of two
#: (below 1 past 2²⁰ itself).
#: The losses are relative (losses.relative_scale), O(1)-O(100) at the usual weights, but a
#: style_weight of 3000 from noise at 64 px (a loss of 8500) overflowed fp16's 65504 in the
#: gradients at the full 2¹² (2800 did not); 2²⁰ leaves a factor of 8 below that.
FP16_SCALED_LOSS_MAX = 2.0**20


def loss_scale(autocast_dtype: torch.dtype | None) -> float:
    """The largest factor :func:`scaled_backward` takes for runs in ``autocast_dtype``."""
    return FP16_LOSS_SCALE if autocast_dtype == torch.float16 else 1.0


def scaled_backward(loss: torch.Tensor, params: Sequence[torch.Tensor], scale: float) -> None:
    """``loss.backward()`` with ``loss`` times a power of two, ``scale`` or less so that the
    scaled loss stays under FP16_SCALED_LOSS_MAX, and each param's gradient divided by it
    after: what the optimizers read in ``grad`` is the gradient of ``loss`` itself. The
    factor is chosen on the device (no host sync), so a CUDA graph captures it all."""
    if scale == 1.0:
        loss.backward()
        return
    with torch.no_grad():
        room = math.log2(FP16_SCALED_LOSS_MAX) - torch.log2(loss.detach().float()).ceil()
        factor = torch.exp2(room.clamp(max=math.log2(scale)))  # a loss of 0: the full scale
    (loss * factor).backward()
    for param in params:
        assert param.grad is not None
        param.grad.div_(factor)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else must be a usable torch device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"not a torch device: {name!r}", field="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("CUDA was asked for but is not available here", field="device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("MPS was asked for but is not available here", field="device")
    return device


#: oneDNN's instruction-set caps (``ONEDNN_MAX_CPU_ISA``) below native bf16.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX-BF16 or AVX512-BF16), unless
    oneDNN is held below them (``ONEDNN_MAX_CPU_ISA=AVX2``, say).

    Elsewhere oneDNN emulates bf16, which is slower than fp32.
    """
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        # Native bf16 only (Ampere and later): torch's default also counts emulated bf16,
        # which T4 and V100 class cards would run slower than fp16.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def load_extractor(
    name: str, *, device: torch.device, precision: str, pooling: Pooling = "max"
) -> FeatureExtractor:
    """The backbone as the engine runs it at ``precision`` (cached once per process).

    Lower precisions run under autocast with weights stored in autocast's dtype and
    activations in channels_last, the layout oneDNN's bf16 kernels and cuDNN's tensor cores
    want.
    """
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    return load_backbone(
        name,
        device=device,
        pooling=pooling,
        dtype=autocast_dtype or torch.float32,
        channels_last=autocast_dtype is not None,
    )
