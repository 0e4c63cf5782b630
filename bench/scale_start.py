"""The start of each pyramid scale with L-BFGS: how far the loss rises before it falls,
for each trust-region bound (``worker.engine.optimize.LBFGS_MAX_STEP``), side by side in
one process on the same inputs.

    python bench/scale_start.py [--size 256] [--iterations 150] [--bounds none,0.25,0.1,0.05]

For each bound: per scale, the highest loss of its first 10 iterations
over the loss at its first iteration (1.0: it never got worse), and the final loss.
Writes the loss curves to ``docs/scale-start.png`` with ``--plot``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.images import decode_image  # noqa: E402
from worker.engine import (  # noqa: E402
    Iterate,
    optimize,
    stylize,
)


def run(bound: float | None, size: int, iterations: int) -> list[Iterate]:
    limits = {"max_bytes": 1 << 26, "max_pixels": 1 << 26}
    content = decode_image(REPO / "examples" / "chelsea.jpg", **limits)
    style = decode_image(REPO / "shared" / "presets" / "starry-night.jpg", **limits)
    optimize.LBFGS_MAX_STEP = bound
    seen: list[Iterate] = []
    stylize(
        content=content, styles=[style], size=size, iterations=iterations,
        backbone="vgg19-random", seed=0, precision="fp32", progress=seen.append,
    )  # fmt: skip
    return seen


def rise(seen: list[Iterate]) -> list[float]:
    ratios = []
    for scale in range(seen[-1].scales):
        losses = [it.loss for it in seen if it.scale == scale][:10]
        ratios.append(max(losses) / losses[0])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--bounds", default="none,0.25,0.1,0.05")
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    curves = {}
    print("bound\trise per scale (peak of first 10 / first)\tfinal loss")
    for raw in args.bounds.split(","):
        bound = None if raw == "none" else float(raw)
        seen = run(bound, args.size, args.iterations)
        curves[raw] = seen
        ratios = ", ".join(f"{r:.3g}" for r in rise(seen))
        print(f"{raw}\t{ratios}\t{seen[-1].loss:.4g}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7, 4))
        for raw, seen in curves.items():
            axes.plot([it.iteration for it in seen], [it.loss for it in seen], label=raw)
        axes.set_yscale("log")
        axes.set_xlabel("iteration")
        axes.set_ylabel("loss")
        axes.legend(title="max step")
        figure.tight_layout()
        figure.savefig(REPO / "docs" / "scale-start.png", dpi=100)


if __name__ == "__main__":
    main()
