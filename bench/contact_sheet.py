"""The contact sheet: every shipped photo × every preset painting with the default options,
and a sweep of ``style_strength`` on one pair, each picture with its quality scores
(bench/quality.py). Run it whenever the defaults change.

    python bench/contact_sheet.py [--size 256] [--iterations 300] [--backbone vgg19-random]
        [--update docs/benchmarks.md]

Writes ``docs/contact-sheet.png``, ``docs/strength-sweep.png`` and
``bench/results/contact-sheet.json``; ``--update`` replaces the "contact-sheet" section of
the Markdown file with the scores' table. Every option but size and iterations is the
engine's default; the images are the repository's own (examples/, shared/presets/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image, ImageDraw  # noqa: E402

from bench.quality import scores  # noqa: E402
from bench.report import machine, update_section  # noqa: E402
from shared.options import DEFAULTS, defaults  # noqa: E402
from shared.presets import presets  # noqa: E402
from worker.engine import stylize  # noqa: E402

#: Every shipped photo (examples/, licences in its SOURCES.md).
PHOTOS = {path.stem: path for path in sorted((REPO / "examples").glob("*.jpg"))}
SWEEP = ("chelsea", "starry-night", (0.0, 0.3, 0.6, 0.8, 1.0))
#: Pass marks of the criteria (bench/quality.py): the scene's layout kept, and at least
#: half of the way to the painting's texture statistics and a third to its colours.
PASS = {"scene": 0.5, "style": 0.5, "colour": 0.33}
LABEL = 34  # px of text under each picture: two lines


def passes(score: dict[str, float]) -> bool:
    return all(score[name] >= mark for name, mark in PASS.items())


def render(photo: Image.Image, painting: Image.Image, args: argparse.Namespace,
           **options: object) -> tuple[Image.Image, dict[str, float], float]:  # fmt: skip
    started = time.perf_counter()
    result = stylize(
        content=photo, styles=[painting], size=args.size, iterations=args.iterations,
        backbone=args.backbone, seed=0, **options,
    )  # fmt: skip
    return result.image, scores(result.image, photo, painting), time.perf_counter() - started


def labelled(image: Image.Image, cell: int, text: str) -> Image.Image:
    canvas = Image.new("RGB", (cell, cell + LABEL), "white")
    image = image.copy()
    image.thumbnail((cell, cell))
    canvas.paste(image, ((cell - image.width) // 2, (cell - image.height) // 2))
    ImageDraw.Draw(canvas).multiline_text((4, cell + 4), text, fill="black")
    return canvas


def sheet(rows: list[list[Image.Image]]) -> Image.Image:
    width = max(sum(cell.width for cell in row) for row in rows)
    height = sum(max(cell.height for cell in row) for row in rows)
    out = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for cell in row:
            out.paste(cell, (x, y))
            x += cell.width
        y += max(cell.height for cell in row)
    return out


def describe(score: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in score.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=defaults()["iterations"])
    parser.add_argument("--backbone", default=DEFAULTS.backbone)
    parser.add_argument("--cell", type=int, default=200, help="px per picture on the sheet")
    parser.add_argument("--update", type=Path, help="replace the section in this Markdown file")
    parser.add_argument("--sweep-only", action="store_true", help="only the strength sweep")
    args = parser.parse_args()

    photos = {name: Image.open(path).convert("RGB") for name, path in PHOTOS.items()}
    paintings = {name: Image.open(p.path).convert("RGB") for name, p in presets().items()}
    grid: list[dict[str, object]] = []
    sweep: list[dict[str, float]] = []
    if not args.sweep_only:
        header = [Image.new("RGB", (args.cell, args.cell + LABEL), "white")]
        header += [labelled(p, args.cell, name) for name, p in paintings.items()]
        rows = [header]
        for photo_name, photo in photos.items():
            row = [labelled(photo, args.cell, photo_name)]
            for painting_name, painting in paintings.items():
                image, score, seconds = render(photo, painting, args)
                entry = {"photo": photo_name, "painting": painting_name, **score}
                grid.append({**entry, "seconds": seconds, "pass": passes(score)})
                row.append(labelled(image, args.cell, describe(score)))
                print(photo_name, painting_name, describe(score), f"{seconds:.1f} s", flush=True)
            rows.append(row)
        sheet(rows).save(REPO / "docs" / "contact-sheet.png")

    photo_name, painting_name, strengths = SWEEP
    photo, painting = photos[photo_name], paintings[painting_name]
    row = [labelled(photo, args.cell, photo_name)]
    for strength in strengths:
        image, score, seconds = render(photo, painting, args, style_strength=strength)
        sweep.append({"style_strength": strength, **score})
        row.append(labelled(image, args.cell, f"strength {strength:g}\n{describe(score)}"))
        print("strength", strength, describe(score), flush=True)
    sheet([row]).save(REPO / "docs" / "strength-sweep.png")
    if args.sweep_only:
        return

    results = {"machine": machine(), "size": args.size, "iterations": args.iterations,
               "backbone": args.backbone, "pass": PASS, "grid": grid, "sweep": sweep}  # fmt: skip
    out = REPO / "bench" / "results" / "contact-sheet.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.update:
        lines = [
            f"{machine()}; {args.backbone}, {args.size} px, {args.iterations} "
            "iterations, every other option at its default.",
            "",
            "| photo | painting | scene | style | colour | passes |",
            "|---|---|---|---|---|---|",
        ]
        for entry in grid:
            lines.append(
                f"| {entry['photo']} | {entry['painting']} | {entry['scene']:.2f} | "
                f"{entry['style']:.2f} | {entry['colour']:.2f} | "
                f"{'yes' if entry['pass'] else 'no'} |"
            )
        lines += ["", "| style_strength | scene | style | colour |", "|---|---|---|---|"]
        for entry in sweep:
            lines.append(
                f"| {entry['style_strength']:g} | {entry['scene']:.2f} | {entry['style']:.2f} | "
                f"{entry['colour']:.2f} |"
            )
        update_section(args.update, "contact-sheet", lines)


if __name__ == "__main__":
    main()
