"""How to split a run's iterations across the pyramid's scales: the finest scale's share of
them against the loss the result reaches at full size and the time it takes, side by side
in one process on the same inputs.

    python bench/pyramid_split.py [--size 512] [--iterations 300] [--shares even,0.5,0.75]
        [--update docs/benchmarks.md]

Each share gives the finest scale that fraction of the iterations and the coarser scales
the rest, evenly (``even``: every scale the same, the engine's split before this bench). The
result is scored by the objective at full size (the same weights, relative terms), and by
bench/quality.py's scene and style scores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.quality import scores  # noqa: E402
from bench.report import machine, update_section  # noqa: E402
from shared.pyramid import auto_scales, pyramid  # noqa: E402
from worker.engine import (  # noqa: E402
    optimize,
    prepare,
    stylize,
)
from worker.engine.device import load_extractor  # noqa: E402
from worker.engine.imaging import to_tensor  # noqa: E402
from worker.engine.objective import build_objective  # noqa: E402


def split(share: str):  # type: ignore[no-untyped-def]
    def plan(size: int, scales: int, iterations: int) -> list[tuple[int, int]]:
        even = pyramid(size, scales, iterations)
        if share == "even" or scales == 1:
            return even
        finest = round(iterations * float(share))
        base, remainder = divmod(iterations - finest, scales - 1)
        counts = [base] * (scales - 1)
        counts[-1] += remainder
        return [(side, count) for (side, _), count in zip(even, [*counts, finest], strict=True)]

    return plan


def full_size_loss(image: Image.Image, photo: Image.Image, painting: Image.Image,
                   options: dict[str, object]) -> float:  # fmt: skip
    run = prepare(content=photo, styles=[painting], **options)
    device = torch.device("cpu")
    extractor = load_extractor(run.options.backbone, device=device, precision="fp32")
    size = run.options.size
    content = to_tensor(photo, long_side=size, device=device)
    style = to_tensor(painting, long_side=size, device=device)
    objective = build_objective(
        extractor, run.options, run.style_weights, content, [style], None, False
    )
    with torch.no_grad():
        x = to_tensor(image, long_side=size, device=device)
        return float(objective.parts(x).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--shares", default="even,0.5,0.75")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--update", type=Path)
    args = parser.parse_args()
    photo = Image.open(REPO / "examples" / "chelsea.jpg").convert("RGB")
    painting = Image.open(REPO / "shared" / "presets" / "starry-night.jpg").convert("RGB")
    options = {"size": args.size, "iterations": args.iterations, "backbone": "vgg19-random",
               "seed": 0, "device": "cpu"}  # fmt: skip
    rows = []
    original = optimize.pyramid
    for round_ in range(args.rounds):
        for share in args.shares.split(","):
            optimize.pyramid = split(share)
            try:
                started = time.perf_counter()
                result = stylize(content=photo, styles=[painting], **options)
                seconds = time.perf_counter() - started
            finally:
                optimize.pyramid = original
            plan = split(share)(args.size, auto_scales(args.size), args.iterations)
            loss = full_size_loss(result.image, photo, painting, options)
            score = scores(result.image, photo, painting)
            rows.append((share, plan, loss, seconds, score))
            print(round_, share, plan, f"loss {loss:.4f}", f"{seconds:.1f} s",
                  {k: round(v, 3) for k, v in score.items()}, flush=True)  # fmt: skip
    if args.update:
        lines = [
            f"`python bench/pyramid_split.py --size {args.size} --iterations {args.iterations}`:"
            " `examples/chelsea.jpg` × *The Starry Night*, `vgg19-random`, precision auto, seed 0, "
            f"one process. {machine()}.",
            "",
            "| finest scale's share | iterations per scale | loss at full size | seconds "
            "| scene | style |",
            "|---|---|---|---|---|---|",
        ]
        for share, plan, loss, seconds, score in rows:
            counts = " + ".join(str(count) for _, count in plan)
            lines.append(f"| {share} | {counts} | {loss:.4f} | {seconds:.1f} | "
                         f"{score['scene']:.2f} | {score['style']:.2f} |")  # fmt: skip
        update_section(args.update, "pyramid-split", lines)


if __name__ == "__main__":
    main()
