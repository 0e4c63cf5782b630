"""Does the wait buy a better picture? The *Balanced* preset's optimized picture against the
*Instant* feed-forward picture of the same inputs, on every shipped photo × every preset
painting, with the measures of bench/quality.py (neither run optimizes them).

    python bench/balanced_vs_instant.py [--size 512] [--iterations 300]
        [--update docs/benchmarks.md]

Writes ``docs/balanced-vs-instant.png`` (per pair: the photo, the instant picture, the
balanced one, each with its scores) and ``bench/results/balanced-vs-instant.json``;
``--update`` replaces the "balanced-vs-instant" section of the Markdown file. The balanced
run is the form's preset (512 px, 300 iterations, every other option the default, so the
default backbone); the instant picture is ``worker.feedforward.stylize_fast`` at the same
size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from bench.contact_sheet import PHOTOS, describe, labelled, sheet  # noqa: E402
from bench.quality import scores  # noqa: E402
from bench.report import machine, update_section  # noqa: E402
from shared.options import DEFAULTS  # noqa: E402
from shared.presets import presets  # noqa: E402
from worker.engine import stylize  # noqa: E402
from worker.feedforward import stylize_fast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=DEFAULTS.size)
    parser.add_argument("--iterations", type=int, default=DEFAULTS.iterations)
    parser.add_argument("--cell", type=int, default=220)
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    args = parser.parse_args()

    rows, entries = [], []
    for photo_name, path in PHOTOS.items():
        photo = Image.open(path).convert("RGB")
        for painting_name, preset in presets().items():
            painting = Image.open(preset.path).convert("RGB")
            started = time.perf_counter()
            instant = stylize_fast(photo, [painting], size=args.size)
            instant_seconds = time.perf_counter() - started
            started = time.perf_counter()
            balanced = stylize(content=photo, styles=[painting], size=args.size,
                               iterations=args.iterations, seed=0).image  # fmt: skip
            balanced_seconds = time.perf_counter() - started
            fast, slow = scores(instant, photo, painting), scores(balanced, photo, painting)
            entry = {"photo": photo_name, "painting": painting_name, "instant": fast,
                     "balanced": slow, "instant_seconds": instant_seconds,
                     "balanced_seconds": balanced_seconds,
                     "more_painting": slow["style"] >= fast["style"],
                     "no_less_scene": slow["scene"] >= fast["scene"]}  # fmt: skip
            entries.append(entry)
            print(photo_name, painting_name, "instant", describe(fast), "balanced",
                  describe(slow), f"{balanced_seconds:.0f} s", flush=True)  # fmt: skip
            rows.append([
                labelled(painting, args.cell, f"{photo_name} x {painting_name}"),
                labelled(instant, args.cell, f"instant\n{describe(fast)}"),
                labelled(balanced, args.cell, f"balanced\n{describe(slow)}"),
            ])  # fmt: skip
    # Two pairs a row: photo × painting, instant, balanced.
    paired = [rows[i] + (rows[i + 1] if i + 1 < len(rows) else []) for i in range(0, len(rows), 2)]
    sheet(paired).save(REPO / "docs" / "balanced-vs-instant.png")
    out = REPO / "bench" / "results" / "balanced-vs-instant.json"
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "size": args.size,
                "iterations": args.iterations,
                "pairs": entries,
            },
            indent=1,
        )
        + "\n"
    )
    if args.update:
        lines = [
            f"{machine()}; {args.size} px, balanced: {args.iterations} iterations on the "
            f"default backbone ({DEFAULTS.backbone}), every other option at its default.",
            "",
            "| photo | painting | instant scene / style / colour | balanced scene / style / "
            "colour | balanced: more painting, no less scene |",
            "|---|---|---|---|---|",
        ]
        for e in entries:
            fast, slow = e["instant"], e["balanced"]
            verdict = "yes" if e["more_painting"] and e["no_less_scene"] else "no"
            lines.append(
                f"| {e['photo']} | {e['painting']} | {fast['scene']:.2f} / {fast['style']:.2f} / "
                f"{fast['colour']:.2f} | {slow['scene']:.2f} / {slow['style']:.2f} / "
                f"{slow['colour']:.2f} | {verdict} |"
            )
        update_section(args.update, "balanced-vs-instant", lines)


if __name__ == "__main__":
    main()
