"""Routing: which broker queue a job goes to, by device class and by the memory it needs.

Queues are named ``<queue>.gpu.<tier>`` and ``<queue>.cpu``. A GPU worker with M bytes of
free memory consumes every GPU tier whose bound is at most M (so it can run any job there);
a CPU worker consumes the CPU queue. A job goes to the smallest GPU tier that holds it if a
live GPU worker consumes that tier, else to the CPU queue if a CPU worker has the memory,
else it is refused at submission: no worker could ever run it. CPU workers are the
fallback, never preferred over a GPU that fits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared.errors import StylequeueError

GIB = 1024**3
#: The GPU tiers: named after the cards they suit (2 GB for previews, 8, 24 for consumer
#: cards, 80 for A100/H100, 141 for H200), bounded by what such a card has free for a job
#: (GiB; a "24 GB" card shows about 23.6 GiB, less the driver's and the framework's share).
GPU_TIERS: tuple[tuple[str, float], ...] = (
    ("2g", 1.5), ("8g", 6), ("24g", 21), ("80g", 72), ("140g", 128),
)  # fmt: skip
#: Peak memory per output pixel (VGG19 up to relu5_1): the activations kept for the backward
#: pass and their gradients, ≈ 2.5 KB measured on the CPU here in fp32, and on an H200
#: (bench/gpu.sh, peak allocated from 512 to 1024 px, less the history) 2.63 KB in fp32,
#: 2.66 KB in TF32, 1.7 KB in bf16: hence 3 KB, so that fp32 jobs on a GPU keep a margin;
#: plus L-BFGS's history (100 pairs of image-sized fp32 tensors: 2.4 KB); Adam keeps 2
#: moments.
ACTIVATION_BYTES_PER_PIXEL = 3_000
LBFGS_BYTES_PER_PIXEL = 2_400
ADAM_BYTES_PER_PIXEL = 24
#: Each style's features are computed once per scale, without gradients: the peak is the
#: widest pair of consecutive activations (relu1_x: 2 × 64 channels × 4 B = 512 B/px) plus
#: the fp32 input tensor; measured 0.6 KB/px on the CPU here (tests/test_memory.py keeps
#: the whole estimate above measured peaks). Every style tensor of a scale is held at once
#: (12 B/px), the largest is the one whose forward pass sets the peak.
STYLE_FORWARD_BYTES_PER_PIXEL = 1_000
STYLE_TENSOR_BYTES_PER_PIXEL = 12
#: Decoding an input image: Pillow's RGB copy (3 B/px), a 4 B/px copy while it is made
#: upright or converted, and a float tensor of the same pixels while it is resized.
INPUT_BYTES_PER_PIXEL = 20
#: The backbone's weights, the framework's workspace and the inputs.
FIXED_BYTES = GIB


class JobTooLarge(StylequeueError):
    code = "job_too_large"
    http_status = 422


def job_memory_bytes(
    *,
    output_pixels: int,
    optimizer: str,
    style_pixels: Sequence[int] = (),
    input_pixels: int = 0,
    lbfgs_history: int = 100,
) -> int:
    """An upper estimate of the memory a job needs on its device: the optimization at
    ``output_pixels``, the style images at the finest scale (``style_pixels``, one each),
    and decoding its inputs (``input_pixels``: the content's and the styles' together).
    ``lbfgs_history``: the pairs L-BFGS keeps (LBFGS_BYTES_PER_PIXEL is for 100)."""
    per_pixel = ACTIVATION_BYTES_PER_PIXEL + (
        LBFGS_BYTES_PER_PIXEL * lbfgs_history // 100
        if optimizer == "lbfgs"
        else ADAM_BYTES_PER_PIXEL
    )
    styles = STYLE_TENSOR_BYTES_PER_PIXEL * sum(style_pixels) + STYLE_FORWARD_BYTES_PER_PIXEL * max(
        style_pixels, default=0
    )
    return FIXED_BYTES + per_pixel * output_pixels + styles + INPUT_BYTES_PER_PIXEL * input_pixels


def gpu_tier(memory_bytes: int) -> str | None:
    """The smallest GPU tier that holds a job needing ``memory_bytes``."""
    for name, bound in GPU_TIERS:
        if memory_bytes <= bound * GIB:
            return name
    return None


def worker_queues(base: str, kind: str, memory_bytes: int) -> list[str]:
    """The queues a worker consumes: its tiers, and ``base`` itself (messages sent before
    routing existed, or by hand)."""
    if kind == "gpu":
        tiers = [f"{base}.gpu.{name}" for name, bound in GPU_TIERS if bound * GIB <= memory_bytes]
        # A small GPU still takes the smallest tier's jobs that fit it, via the CPU queue.
        return [*tiers, base] if tiers else [f"{base}.cpu", base]
    return [f"{base}.cpu", base]


def all_queues(base: str) -> list[str]:
    """Every queue a job of this service can be sent to (its preview queue included)."""
    return [
        base, f"{base}.cpu", *(f"{base}.gpu.{name}" for name, _ in GPU_TIERS), f"{base}.preview"
    ]  # fmt: skip


def choose_queue(base: str, memory_bytes: int, workers: Iterable[Mapping[str, Any]]) -> str:
    """The queue for a job among the live ``workers``' queues; :class:`JobTooLarge` if no
    worker consumes one that fits. With no worker of this service (``base``) known, the
    base queue, which every worker consumes."""
    workers = [worker for worker in workers if base in worker.get("queues", [])]
    if not workers:
        return base
    consumed = {queue for worker in workers for queue in worker.get("queues", [])}
    tier = gpu_tier(memory_bytes)
    if tier is not None and f"{base}.gpu.{tier}" in consumed:
        return f"{base}.gpu.{tier}"
    cpu_memory = [
        int(worker.get("memory_bytes", 0))
        for worker in workers
        if f"{base}.cpu" in worker.get("queues", [])
    ]
    if any(memory >= memory_bytes for memory in cpu_memory):
        return f"{base}.cpu"
    largest = max([int(worker.get("memory_bytes", 0)) for worker in workers] or [0])
    raise JobTooLarge(
        f"the job needs about {memory_bytes / GIB:.1f} GiB; the largest live worker offers "
        f"{largest / GIB:.1f} GiB: choose a smaller size",
        field="size",
    )
