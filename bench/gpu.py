"""The engine on a GPU: seconds per step and peak memory in fp32, TF32 and bf16, and the
throughput of k same-size jobs batched through one forward pass.

Not a test. Needs only torch, numpy and pillow (what a GPU machine has), and the engine
(``worker/engine``): no service, no database. ``bench/gpu.sh`` runs it with the sizes and
counts that fit well inside 8 minutes on one H200; ``--device cpu --sizes 64`` checks it
anywhere.

* per step: the engine's own run (single scale, L-BFGS, the content photo and a painting
  from ``--images``, the offline backbone ``vgg19-random``: same architecture, same cost),
  median seconds per step after warm-up, and ``torch.cuda.max_memory_allocated``;
  ``tf32`` is the fp32 run with TF32 matmuls and convolutions allowed;
* batching: one loss evaluation (forward through VGG19 to relu5_1, Grams, backward to the
  pixels) for k images of one size at once against k separate ones: images per second and
  the speed-up of batching. A worker may batch only where this is well above 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.engine import Iterate, stylize
from worker.engine.losses import gram_matrix
from worker.engine.optimize import load_extractor

ROOT = Path(__file__).resolve().parents[1]
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def per_step(
    content: Image.Image, style: Image.Image, size: int, mode: str, steps: int, device: torch.device
) -> dict[str, Any]:
    set_tf32(mode == "tf32")
    precision = "bf16" if mode == "bf16" else "fp32"
    stamps: list[float] = []

    def record(_: Iterate) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps.append(time.perf_counter())
    stylize(
        content=content, styles=[style], size=size, scales=1, iterations=steps, tv_weight=0.0,
        backbone="vgg19-random", precision=precision, device=str(device), progress=record,
    )  # fmt: skip
    gaps = [b - a for a, b in itertools.pairwise(stamps)][3:]  # after warm-up
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    set_tf32(False)
    return {"size": size, "mode": mode, "seconds_per_step": statistics.median(gaps),
            "peak_memory_mib": peak / 2**20}  # fmt: skip


def batched(size: int, batch: int, repeats: int, device: torch.device, mode: str) -> float:
    """Images per second of one loss evaluation (forward, Grams, backward) on ``batch``
    images at once."""
    set_tf32(mode == "tf32")
    precision = "bf16" if mode == "bf16" else "fp32"
    extractor = load_extractor("vgg19-random", device=device, precision=precision).truncated(
        "relu5_1"
    )
    height = size * 3 // 4
    images = torch.rand(batch, 3, height, size, device=device)
    if mode == "bf16":  # as the engine runs bf16: channels_last
        images = images.contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)
    targets = {name: torch.rand(batch, 1, 1, device=device) for name in STYLE_LAYERS}
    dtype = torch.bfloat16 if mode == "bf16" else None

    def evaluate() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = extractor(images, STYLE_LAYERS)
        loss = sum(
            ((gram_matrix(features[name]) - targets[name]) ** 2).mean() for name in STYLE_LAYERS
        )
        loss.backward()  # type: ignore[union-attr]
        images.grad = None

    for _ in range(2):
        evaluate()
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        evaluate()
    synchronize(device)
    set_tf32(False)
    return batch * repeats / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--modes", default="fp32,tf32,bf16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--batch-size", type=int, default=512, help="image size for batching")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    photo = args.images / "content" / "tubingen.jpg"
    if photo.is_file():
        content = Image.open(photo).convert("RGB")
        style = Image.open(args.images / "style" / "starry_night.jpg").convert("RGB")
    else:  # only the repository at hand (a GPU machine): two of its presets; a step's cost
        # depends on the size, not on what the pictures show
        presets = sorted((ROOT / "shared" / "presets").glob("*.jpg"))
        content, style = (Image.open(path).convert("RGB") for path in presets[:2])

    steps = []
    print("| size | mode | s/step | peak MiB |\n|---|---|---|---|", flush=True)
    for size in map(int, args.sizes.split(",")):
        for mode in args.modes.split(","):
            row = per_step(content, style, size, mode, args.steps, device)
            steps.append(row)
            print(f"| {size} | {mode} | {row['seconds_per_step']:.4f} | "
                  f"{row['peak_memory_mib']:.0f} |", flush=True)  # fmt: skip

    batching = []
    print(f"\n| batch at {args.batch_size} px | mode | images/s | vs batch 1 |\n|---|---|---|---|")
    for mode in args.modes.split(","):
        single = None
        for batch in map(int, args.batches.split(",")):
            rate = batched(args.batch_size, batch, args.repeats, device, mode)
            single = single or rate
            batching.append({"batch": batch, "mode": mode, "images_per_second": rate})
            print(f"| {batch} | {mode} | {rate:.2f} | {rate / single:.2f}× |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "steps": steps, "batching": batching}))


if __name__ == "__main__":
    main()
