"""The defaults' calibration: named variants of the options, each run on every shipped photo
× every preset painting, scored with measures the run did not optimize (bench/quality.py).

    python bench/tune.py --size 256 --iterations 300 paper halving ... [--sheets DIR]

Prints one line per picture and a summary per variant (the mean and the lowest scene, the
mean style and colour, and how many pictures pass bench/contact_sheet.py's marks), and
writes ``bench/results/tune-<size>.json``; ``--sheets`` also writes each variant's pictures
as a contact sheet, to look at. A variant's options are passed to ``stylize`` over the
defaults; VARIANTS below holds those the calibration tried (docs/benchmarks.md, "Calibration
on real features", gives their figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from bench.contact_sheet import PASS, PHOTOS, describe, labelled, passes, sheet  # noqa: E402
from bench.quality import scores  # noqa: E402
from bench.report import machine  # noqa: E402
from shared.presets import presets  # noqa: E402
from worker.engine import stylize  # noqa: E402


def normalized(*weights: float) -> tuple[float, ...]:
    """Layer weights summing to 1, as the defaults do: the total style weight stays β's."""
    return tuple(round(w / sum(weights), 4) for w in weights)


SHALLOW = normalized(256, 64, 16, 4, 1)  # crowsonkb's style layer weights, relu1_1 first
HALVING = normalized(16, 8, 4, 2, 1)  # the defaults' (shared.options.halving_weights)
EQUAL = (0.2, 0.2, 0.2, 0.2, 0.2)  # the paper's

#: The first calibration's content layer (the paper's); its variants keep it, so that their
#: figures in docs/benchmarks.md stay reproducible.
C42: dict[str, Any] = {"content_layers": ("relu4_2",)}

#: The variants the calibration on vgg16-caffe tried (docs/benchmarks.md, "Calibration on
#: real features"); "defaults" is the options as they stand.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "paper": {"style_layer_weights": EQUAL, **C42},
    "shallow": {"style_layer_weights": SHALLOW, **C42},
    "halving": {"style_layer_weights": HALVING, **C42},
    "halving-0.75": {"style_layer_weights": HALVING, "style_strength": 0.75, **C42},
    "shallow-0.8": {"style_layer_weights": SHALLOW, "style_strength": 0.8, **C42},
    "w2": {"style_loss": "wasserstein", "style_layer_weights": EQUAL, **C42},
    "w2-halving": {"style_loss": "wasserstein", "style_layer_weights": HALVING, **C42},
    "adam": {"optimizer": "adam", "style_layer_weights": HALVING, **C42},
    "tv1": {"style_layer_weights": HALVING, "tv_weight": 1.0, **C42},
    "tv10": {"style_layer_weights": HALVING, "tv_weight": 10.0, **C42},
    "scale0.75": {"style_layer_weights": HALVING, "style_scale": 0.75, **C42},
    "content5_2": {"style_layer_weights": HALVING, "content_layers": ("relu5_2",)},
    "content3_3": {"style_layer_weights": HALVING, "content_layers": ("relu3_3",)},
    "content3_3+4_2": {"style_layer_weights": HALVING, "content_layers": ("relu3_3", "relu4_2")},
    "content2_2+4_2": {"style_layer_weights": HALVING, "content_layers": ("relu2_2", "relu4_2")},
    "content3_1+4_2": {"style_layer_weights": HALVING, "content_layers": ("relu3_1", "relu4_2")},
    "scales2": {"style_layer_weights": HALVING, "scales": 2, **C42},
    "scales4": {"style_layer_weights": HALVING, "scales": 4, **C42},
    "200it": {"style_layer_weights": HALVING, "iterations": 200, **C42},
    "100it": {"style_layer_weights": HALVING, "iterations": 100, **C42},
}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """A name from VARIANTS, or ``name=JSON`` for options given here."""
    if "=" in text:
        name, _, options = text.partition("=")
        return name, json.loads(options)
    return text, VARIANTS[text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=parse_variant)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--photos", default=",".join(PHOTOS))
    parser.add_argument("--paintings", default=",".join(presets()))
    parser.add_argument("--cell", type=int, default=200)
    parser.add_argument("--sheets", type=Path, help="write each variant's pictures here")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    photos = {n: Image.open(PHOTOS[n]).convert("RGB") for n in args.photos.split(",")}
    paintings = {n: Image.open(presets()[n].path).convert("RGB") for n in args.paintings.split(",")}
    summary: dict[str, Any] = {}
    out = args.out or REPO / "bench" / "results" / f"tune-{args.size}.json"
    out.parent.mkdir(exist_ok=True)
    for name, options in args.variants:
        rows, entries = [], []
        for photo_name, photo in photos.items():
            row = [labelled(photo, args.cell, photo_name)]
            for painting_name, painting in paintings.items():
                started = time.perf_counter()
                # A variant may set its own size or iterations too.
                given = {"size": args.size, "iterations": args.iterations, **options}
                result = stylize(content=photo, styles=[painting], seed=0, **given)
                score = scores(result.image, photo, painting)
                seconds = time.perf_counter() - started
                entries.append({"photo": photo_name, "painting": painting_name, **score,
                                "pass": passes(score), "seconds": seconds})  # fmt: skip
                row.append(labelled(result.image, args.cell, describe(score)))
                print(name, photo_name, painting_name, describe(score), f"{seconds:.1f} s",
                      flush=True)  # fmt: skip
            rows.append(row)
        if args.sheets:
            args.sheets.mkdir(parents=True, exist_ok=True)
            sheet(rows).save(args.sheets / f"{name}-{args.size}.png")
        mean = {k: sum(e[k] for e in entries) / len(entries) for k in PASS}
        summary[name] = {
            "options": options, **mean,
            "lowest_scene": min(e["scene"] for e in entries),
            "passes": sum(e["pass"] for e in entries), "pictures": len(entries),
            "entries": entries,
        }  # fmt: skip
        print(f"== {name}: {describe(mean)} lowest scene {summary[name]['lowest_scene']:.2f} "
              f"passes {summary[name]['passes']}/{len(entries)}", flush=True)  # fmt: skip
        # Written after every variant: a long run stopped halfway keeps what it measured.
        out.write_text(json.dumps({"machine": machine(), "size": args.size,
                                   "iterations": args.iterations, "variants": summary},
                                  indent=1, default=list) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
