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
* batching: k runs of one size through ``stylize_together``, as a worker batches k jobs
  (one forward and backward pass for all, an L-BFGS step each), against one run: images
  times iterations per second and the speed-up. ``STYLEQUEUE_BATCH_MAX_SIZE`` should stop
  below the first size where this is not well above 1 (on a 2-core CPU: 256 px).
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
from worker.engine.stylize import prepare, stylize_together

ROOT = Path(__file__).resolve().parents[1]


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


def batched(
    content: Image.Image, style: Image.Image, size: int, batch: int, mode: str, steps: int,
    device: torch.device,
) -> float:  # fmt: skip
    """Image-iterations per second of ``batch`` runs through :func:`stylize_together`, as a
    worker batches jobs (single scale, L-BFGS each, one seed each), after warm-up."""
    set_tf32(mode == "tf32")
    precision = "bf16" if mode == "bf16" else "fp32"
    stamps: list[float] = []

    def record(_: Iterate) -> None:  # the first run's callback: once per batched iteration
        synchronize(device)
        stamps.append(time.perf_counter())

    runs = [
        prepare(content=content, styles=[style], size=size, scales=1, iterations=steps,
                backbone="vgg19-random", precision=precision, device=str(device), seed=index,
                progress=record if index == 0 else None)
        for index in range(batch)
    ]  # fmt: skip
    stylize_together(runs)
    gaps = [b - a for a, b in itertools.pairwise(stamps)][3:]  # after warm-up
    set_tf32(False)
    return batch / statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "images")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--modes", default="fp32,tf32,bf16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--batch-sizes", default="128,256,512", help="image sizes for batching")
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
    print("\n| size | mode | batch | image-iterations/s | vs batch 1 |\n|---|---|---|---|---|")
    for size in map(int, args.batch_sizes.split(",")):
        for mode in args.modes.split(","):
            single = None
            for batch in map(int, args.batches.split(",")):
                rate = batched(content, style, size, batch, mode, args.steps, device)
                single = single or rate
                batching.append({"size": size, "mode": mode, "batch": batch,
                                 "image_iterations_per_second": rate})  # fmt: skip
                print(f"| {size} | {mode} | {batch} | {rate:.2f} | {rate / single:.2f}× |",
                      flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": name, "steps": steps, "batching": batching}))


if __name__ == "__main__":
    main()
