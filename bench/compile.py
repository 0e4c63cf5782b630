"""Does ``torch.compile`` pay for the engine's loss evaluation? Side by side, one run.

Not a test. Builds the engine's objective (the default layers, bf16 where the CPU has native
bf16) at ``--size`` px, then alternates an eager evaluation (forward, Grams, losses,
backward) with one through ``torch.compile(objective.parts)`` (inductor, default mode),
``--samples`` times, and prints the compile time and both medians.

On a GPU (``--device cuda``), ``--mode reduce-overhead`` also replays each evaluation as a
CUDA graph: where a small image leaves the GPU waiting on kernel launches, that is what
could pay.

Usage: ``python bench/compile.py [--size 256] [--samples 8] [--device cuda] [--mode M]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from engine import IMAGES_HELP, sample_pair  # bench/engine.py (run as a script)

from shared.normalize import check_options
from shared.options import defaults
from worker.engine.device import AUTOCAST_DTYPES, load_extractor, resolve_precision
from worker.engine.imaging import to_tensor
from worker.engine.objective import build_objective

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help=IMAGES_HELP)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", default=None, help="torch.compile's mode (default: its own)")
    args = parser.parse_args()

    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    layers = defaults()["style_layers"]
    # The default objective, TV included, with the style layers weighed equally.
    options = check_options(styles=1, style_layer_weights=[1 / len(layers)] * len(layers))
    content, style = (
        to_tensor(image, long_side=args.size, device=device) for image in sample_pair(args.images)
    )
    extractor = load_extractor("vgg19-random", device=device, precision=precision)
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    objective = build_objective(
        extractor, options, [1.0], content, [style], autocast_dtype, autocast_dtype is not None
    )
    image = content.clone().requires_grad_(True)

    def evaluation(parts: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        def run() -> float:
            synchronize()
            begin = time.perf_counter()
            image.grad = None
            parts(image).sum().backward()
            synchronize()
            return time.perf_counter() - begin

        return run

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    eager = evaluation(objective.parts)
    begin = time.perf_counter()
    compiled = evaluation(torch.compile(objective.parts, mode=args.mode))
    compiled()  # compiles
    compile_seconds = time.perf_counter() - begin
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    sides = {"eager": eager, "compiled": compiled}
    for round_ in range(args.samples + 1):  # the first round warms up
        # Alternate which goes first, so that neither always runs right after the other.
        for name in sorted(sides, reverse=round_ % 2 == 1):
            times[name].append(sides[name]())
    eager_s, compiled_s = (float(np.median(times[k][1:])) for k in ("eager", "compiled"))
    print(
        f"{args.size} px, {precision}, {device.type}, mode {args.mode}: compile "
        f"{compile_seconds:.0f} s; eager {eager_s:.4f} s, "
        f"compiled {compiled_s:.4f} s per evaluation: {eager_s / compiled_s:.2f}× the eager "
        "speed"
    )


if __name__ == "__main__":
    main()
