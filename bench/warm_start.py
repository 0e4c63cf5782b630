"""Warm start: does starting the optimization from the feed-forward picture (``init=fast``)
reach a given loss sooner than starting from the photo (``init=content``)?

    python bench/warm_start.py [--size 384] [--iterations 200] [--pairs 4] [--repeats 2]
        [--out bench/results/warm-start.json] [--plot docs/warm-start.png] [--quick]

For each photo × painting pair, both inits run in one process on the same inputs, options
and seed, ``--repeats`` times each in ABBA order (content, fast, fast, content; the next
pair the other way round), and the fastest run of each init is kept: the losses repeat
exactly, and only the clock varies with other processes' load. The fast run's clock
starts before the feed-forward pass (worker/feedforward.py, loaded once beforehand as a
worker keeps it), so its curve includes that pass. Records every iteration's (seconds,
loss), the feed-forward time, the final pictures' quality scores (bench/quality.py), the
loss at fixed times, the time each run takes to reach the loss the content run ends at
(and the one it has at half its iterations), the loss of each start image (iteration 1),
and both losses iteration for iteration. Writes the JSON, the loss curves (``--plot``)
and the pictures next to it (``*-pictures.png``), and prints Markdown tables.
``--quick`` (128 px, 30 iterations, one pair, one repeat) only checks that it runs; it
writes to the temporary folder unless told otherwise.

The loss is the engine's relative loss (each term over its target's mean square), of the
image an iteration starts from, at that iteration's pyramid scale: losses of different
scales are not the same objective, so a time to a target counts only iterations at the
target's scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image, ImageDraw  # noqa: E402

from bench.contact_sheet import describe, sheet  # noqa: E402
from bench.quality import scores  # noqa: E402
from bench.report import machine  # noqa: E402
from shared.presets import presets  # noqa: E402
from shared.pyramid import auto_scales, pyramid  # noqa: E402
from worker.engine import Iterate, stylize  # noqa: E402
from worker.feedforward import DEFAULT_THREADS, FeedForward  # noqa: E402

PHOTOS = {"chelsea": REPO / "examples" / "chelsea.jpg", "coffee": REPO / "examples" / "coffee.jpg"}
#: Starry Night, which feed-forward networks are usually shown on, and a painting of
#: flat colour fields, unlike it.
PAINTINGS = ("starry-night", "woman-with-hat")
INITS = ("content", "fast")
#: Seconds at which both curves are read, chosen for the default size and iterations on a
#: 2-core CPU: the first three fall in the coarse scale, the last two in the fine one, all
#: before the runs end (the JSON records each reading's scale).
DEFAULT_TIMES = (1.0, 2.0, 3.0, 6.0, 12.0)
#: Where along the run (share of its iterations) both curves are compared iteration for
#: iteration: free of the clock's noise, since a run's losses repeat exactly.
AT_SHARES = (0.05, 0.25, 0.5, 0.55, 0.75, 1.0)
CELL = 240  # px, the longest side of a picture on the pictures' sheet
LABEL = 34  # px of text under each picture: two lines


@dataclass
class Run:
    init: str
    position: int  #: where in its pair's sequence of runs it ran, 0 first
    feedforward_seconds: float
    curve: list[Iterate] = field(default_factory=list)
    image: Image.Image | None = None
    feedforward_image: Image.Image | None = None
    #: seconds from the clock's start to the run's end (the fast run's includes its pass)
    seconds: float = 0.0

    def elapsed(self, it: Iterate) -> float:
        # Iterate.elapsed counts from when stylize() started; the fast run's clock started
        # before its feed-forward pass.
        return self.feedforward_seconds + it.elapsed


def run(
    init: str,
    position: int,
    photo: Image.Image,
    painting: Image.Image,
    args: argparse.Namespace,
    feedforward: FeedForward,
) -> Run:
    started = time.perf_counter()
    start: str | Image.Image = "content"
    ff_image = None
    if init == "fast":
        ff_image = feedforward.stylize(photo, [painting], size=args.size)
        start = ff_image
    record = Run(init, position, time.perf_counter() - started if init == "fast" else 0.0)
    record.feedforward_image = ff_image
    result = stylize(
        content=photo,
        styles=[painting],
        size=args.size,
        iterations=args.iterations,
        init=start,
        backbone=args.backbone,
        seed=args.seed,
        progress=record.curve.append,
    )
    record.seconds = time.perf_counter() - started
    record.image = result.image
    return record


def loss_at(record: Run, seconds: float) -> dict[str, Any] | None:
    """The loss of the last iterate done by ``seconds``; None before the first or after the
    run ended (it would not be the same run any more)."""
    done = [it for it in record.curve if record.elapsed(it) <= seconds]
    if not done or seconds > record.elapsed(record.curve[-1]):
        return None
    return {"loss": done[-1].loss, "scale": done[-1].scale, "iteration": done[-1].iteration}


def time_to(record: Run, target: float, scale: int) -> dict[str, float] | None:
    """Seconds (and iterations) until an iterate at ``scale`` has a loss at most ``target``;
    None if never."""
    for it in record.curve:
        if it.scale == scale and it.loss <= target:
            return {"seconds": record.elapsed(it), "iteration": it.iteration}
    return None


def checkpoints(total: int) -> list[int]:
    return sorted({max(1, min(total, round(share * total))) for share in AT_SHARES})


def derived(runs: dict[str, Run], times: list[float]) -> dict[str, Any]:
    content = runs["content"].curve
    end, half = content[-1], content[len(content) // 2 - 1]
    targets = {"content_end": end, "content_half": half}
    out: dict[str, Any] = {
        "targets": {
            name: {"loss": it.loss, "scale": it.scale, "iteration": it.iteration}
            for name, it in targets.items()
        }
    }
    for init, record in runs.items():
        first, last = record.curve[0], record.curve[-1]
        out[init] = {
            "first": {
                "loss": first.loss,
                "content": first.content,
                "style": first.style,
                "tv": first.tv,
                "scale": first.scale,
                "seconds": record.elapsed(first),
            },
            "end": {"loss": last.loss, "scale": last.scale, "seconds": record.elapsed(last)},
            "at": {f"{t:g}": loss_at(record, t) for t in times},
            "time_to": {name: time_to(record, it.loss, it.scale) for name, it in targets.items()},
            "at_iteration": {str(n): record.curve[n - 1].loss for n in checkpoints(len(content))},
        }
    return out


def plot(pairs: list[dict[str, Any]], runs: list[dict[str, Run]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(pairs))
    rows = (len(pairs) + columns - 1) // columns
    figure, axes = plt.subplots(
        rows, columns, figsize=(5.5 * columns, 3.6 * rows + 0.6), squeeze=False
    )
    colours = {"content": "tab:blue", "fast": "tab:orange"}
    for ax, pair, pair_runs in zip(axes.flat, pairs, runs, strict=False):
        for init in INITS:
            record = pair_runs[init]
            seconds = [record.elapsed(it) for it in record.curve]
            ax.plot(
                seconds,
                [it.loss for it in record.curve],
                color=colours[init],
                label=f"init={init}",
                linewidth=1.2,
            )
            # Where the next pyramid scale starts: the loss jumps there (another objective).
            for before, after in zip(record.curve, record.curve[1:], strict=False):
                if after.scale != before.scale:
                    ax.axvline(
                        record.elapsed(after), color=colours[init], linestyle=":", linewidth=0.8
                    )
        ff = pair_runs["fast"].feedforward_seconds
        target = pair["derived"]["targets"]["content_end"]["loss"]
        ax.axhline(
            target, color="grey", linestyle="--", linewidth=0.8, label="content run's last loss"
        )
        ax.set_yscale("log")
        ax.set_xlim(left=0)
        ax.set_xlabel("seconds (fast: feed-forward pass included)")
        ax.set_ylabel("loss (relative)")
        ax.set_title(f"{pair['photo']} × {pair['painting']} (feed-forward {ff:.2f} s)", fontsize=10)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    figure.suptitle(textwrap.fill(title, 140), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def labelled(image: Image.Image, height: int, text: str) -> Image.Image:
    """``image`` CELL px on its long side in a CELL-wide cell of the row's
    ``height``, with ``text`` under it."""
    # Every picture at the same scale, small results enlarged, so that they compare.
    scale = CELL / max(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
    )
    canvas = Image.new("RGB", (CELL + 4, height + LABEL), "white")
    canvas.paste(image, ((CELL + 4 - image.width) // 2, (height - image.height) // 2))
    ImageDraw.Draw(canvas).multiline_text((4, height + 4), text, fill="black")
    return canvas


def row_height(images: list[Image.Image]) -> int:
    return max(round(CELL * i.height / max(i.size)) for i in images)


def pictures(
    pairs: list[dict[str, Any]],
    runs: list[dict[str, Run]],
    photos: dict[str, Image.Image],
    paintings: dict[str, Image.Image],
    path: Path,
    title: str,
) -> None:
    rows = []
    for pair, pair_runs in zip(pairs, runs, strict=True):
        fast, content = pair_runs["fast"], pair_runs["content"]
        assert fast.feedforward_image and fast.image and content.image
        quality = pair["quality"]
        photo, painting = photos[pair["photo"]], paintings[pair["painting"]]
        height = row_height([photo, painting])
        rows.append(
            [
                labelled(photo, height, f"photo: {pair['photo']}"),
                labelled(painting, height, f"painting: {pair['painting']}"),
                labelled(
                    fast.feedforward_image,
                    height,
                    f"feed-forward picture ({fast.feedforward_seconds:.2f} s)\n"
                    f"{describe(quality['feedforward'])}",
                ),
                labelled(
                    content.image,
                    height,
                    f"init=content ({content.seconds:.1f} s)\n{describe(quality['content'])}",
                ),
                labelled(
                    fast.image,
                    height,
                    f"init=fast ({fast.seconds:.1f} s, pass included)\n{describe(quality['fast'])}",
                ),
            ]
        )
    body = sheet(rows)
    header = Image.new("RGB", (body.width, 20), "white")
    ImageDraw.Draw(header).text((4, 4), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Four fifths of the size in 256 colours: a quarter of the bytes, still readable.
    full = sheet([[header], [body]])
    small = full.resize((full.width * 4 // 5, full.height * 4 // 5), Image.Resampling.LANCZOS)
    small.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def table(pairs: list[dict[str, Any]], times: list[float]) -> list[str]:
    def reached(value: dict[str, float] | None) -> str:
        if value is None:
            return "not reached"
        return f"{value['seconds']:.1f} s (it. {value['iteration']:.0f})"

    at_columns = " | ".join(f"loss at {t:g} s" for t in times)
    lines = [
        f"| pair | init | feed-forward | loss at it. 1 | {at_columns} | last loss (s) | "
        "to content's last loss | to content's loss at half | scene | style | colour |",
        "|---|---|---|---|" + "---|" * len(times) + "---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for init in INITS:
            d = pair["derived"][init]
            ats = " | ".join(
                "—" if d["at"][f"{t:g}"] is None else f"{d['at'][f'{t:g}']['loss']:.4f}"
                for t in times
            )
            q = pair["quality"][init]
            ff = f"{pair['feedforward_seconds']:.2f} s" if init == "fast" else "—"
            lines.append(
                f"| {pair['photo']} × {pair['painting']} | {init} | {ff} | "
                f"{d['first']['loss']:.4f} | {ats} | "
                f"{d['end']['loss']:.4f} ({d['end']['seconds']:.1f}) | "
                f"{reached(d['time_to']['content_end'])} | "
                f"{reached(d['time_to']['content_half'])} | "
                f"{q['scene']:.2f} | {q['style']:.2f} | {q['colour']:.2f} |"
            )
    return lines


def ratio_table(pairs: list[dict[str, Any]]) -> list[str]:
    """fast ÷ content loss at the same iteration: below 1, the warm start is ahead."""
    iterations = list(pairs[0]["derived"]["content"]["at_iteration"])
    lines = [
        "| pair | " + " | ".join(f"it. {n}" for n in iterations) + " |",
        "|---|" + "---|" * len(iterations),
    ]
    for pair in pairs:
        content, fast = (pair["derived"][init]["at_iteration"] for init in INITS)
        ratios = " | ".join(f"{fast[n] / content[n]:.3f}" for n in iterations)
        lines.append(f"| {pair['photo']} × {pair['painting']} | {ratios} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=len(PHOTOS) * len(PAINTINGS))
    parser.add_argument("--backbone", default="vgg19-random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--times",
        default=",".join(f"{t:g}" for t in DEFAULT_TIMES),
        help="seconds at which to read both curves, comma-separated",
    )
    parser.add_argument(
        "--ff-threads",
        type=int,
        default=DEFAULT_THREADS,
        help="onnxruntime threads of the feed-forward pass (default: the worker's)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="runs of each init per pair (default 2; --quick: 1); the fastest is kept",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--quick", action="store_true", help="128 px, 30 iterations, 1 pair")
    args = parser.parse_args()
    if args.quick:
        args.size, args.iterations, args.pairs = 128, 30, 1
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    # A quick check must neither overwrite the figures the docs show nor leave files in
    # the repository.
    if args.quick:
        scratch = Path(tempfile.gettempdir())
        args.out = args.out or scratch / "warm-start-quick.json"
        args.plot = args.plot or scratch / "warm-start-quick.png"
    args.out = args.out or REPO / "bench" / "results" / "warm-start.json"
    args.plot = args.plot or REPO / "docs" / "warm-start.png"
    times = [float(t) for t in args.times.split(",")]

    photos = {name: Image.open(path).convert("RGB") for name, path in PHOTOS.items()}
    paintings = {name: Image.open(presets()[name].path).convert("RGB") for name in PAINTINGS}
    cases = [(photo, painting) for painting in PAINTINGS for photo in PHOTOS][: args.pairs]

    started = time.perf_counter()
    feedforward = FeedForward(threads=args.ff_threads)
    load_seconds = time.perf_counter() - started
    # Warm up both sides at the real size (backbone built, weights packed, onnxruntime's
    # first-run allocations) so that neither init pays the process's start-up costs.
    photo, painting = photos[cases[0][0]], paintings[cases[0][1]]
    feedforward.stylize(photo, [painting], size=args.size)
    warm_iterations = 2 * auto_scales(args.size)
    stylize(
        content=photo,
        styles=[painting],
        size=args.size,
        iterations=warm_iterations,
        backbone=args.backbone,
        seed=args.seed,
    )

    pairs: list[dict[str, Any]] = []
    all_runs: list[dict[str, Run]] = []
    for index, (photo_name, painting_name) in enumerate(cases):
        photo, painting = photos[photo_name], paintings[painting_name]
        order = INITS if index % 2 == 0 else INITS[::-1]
        # ABBA: each init runs as often first as second within the pair.
        sequence = [i for r in range(args.repeats) for i in (order if r % 2 == 0 else order[::-1])]
        # The machine's load before and after (this bench's own threads count in it): well
        # above the bench's own, the pair shared the cores and its seconds say little.
        load_before = os.getloadavg()[0]
        every: dict[str, list[Run]] = {init: [] for init in INITS}
        for position, init in enumerate(sequence):
            every[init].append(run(init, position, photo, painting, args, feedforward))
        # A run's losses repeat exactly (same inputs, seed and threads); only its clock
        # varies, and other processes can only slow it: the fastest repeat is the one least
        # disturbed.
        runs = {init: min(repeats, key=lambda r: r.seconds) for init, repeats in every.items()}
        repeat = all(
            [it.loss for it in r.curve] == [it.loss for it in repeats[0].curve]
            for repeats in every.values()
            for r in repeats
        )
        fast = runs["fast"]
        assert fast.feedforward_image is not None
        quality = {init: scores(r.image, photo, painting) for init, r in runs.items() if r.image}
        quality["feedforward"] = scores(fast.feedforward_image, photo, painting)
        pair = {
            "photo": photo_name,
            "painting": painting_name,
            "order": sequence,
            "losses_repeat_exactly": repeat,
            "feedforward_seconds": fast.feedforward_seconds,
            "quality": quality,
            "derived": derived(runs, times),
            "curves": {
                init: [
                    {
                        "iteration": it.iteration,
                        "scale": it.scale,
                        "seconds": r.elapsed(it),
                        "loss": it.loss,
                    }
                    for it in r.curve
                ]
                for init, r in runs.items()
            },
            "seconds": {init: r.seconds for init, r in runs.items()},
            "seconds_of_every_repeat": {
                init: [r.seconds for r in repeats] for init, repeats in every.items()
            },
            "feedforward_seconds_of_every_repeat": [r.feedforward_seconds for r in every["fast"]],
            "load_average_1min": [load_before, os.getloadavg()[0]],
        }
        pairs.append(pair)
        all_runs.append(runs)
        d = pair["derived"]
        print(
            f"{photo_name} × {painting_name}: feed-forward {fast.feedforward_seconds:.2f} s; "
            f"last loss content {d['content']['end']['loss']:.4f} "
            f"({runs['content'].seconds:.1f} s), fast {d['fast']['end']['loss']:.4f} "
            f"({fast.seconds:.1f} s); every repeat's seconds: "
            + "; ".join(f"{i} " + ", ".join(f"{r.seconds:.1f}" for r in every[i]) for i in INITS)
            + f"; losses repeat exactly: {repeat}",
            flush=True,
        )

    plan = pyramid(args.size, auto_scales(args.size), args.iterations)
    where = machine()
    results = {
        "machine": where,
        "backbone": args.backbone,
        "size": args.size,
        "iterations": args.iterations,
        "pyramid": plan,
        "seed": args.seed,
        "repeats": args.repeats,
        "feedforward_threads": args.ff_threads,
        "feedforward_load_seconds": load_seconds,
        "times": times,
        "pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    title = (
        f"{args.backbone} (seeded random filters: no pretrained VGG weights), {args.size} px, "
        f"{args.iterations} iterations ({' + '.join(str(n) for _, n in plan)}), seed {args.seed}"
        f"; {where}"
    )
    plot(pairs, all_runs, args.plot, f"loss against wall time: {title}")
    pictures_path = args.plot.with_name(f"{args.plot.stem}-pictures.png")
    pictures(pairs, all_runs, photos, paintings, pictures_path, title)
    print()
    print(title)
    print()
    print("\n".join(table(pairs, times)))
    print()
    print("Loss of init=fast ÷ loss of init=content at the same iteration:")
    print()
    print("\n".join(ratio_table(pairs)))
    print(f"\nwrote {args.out}, {args.plot}, {pictures_path}")


if __name__ == "__main__":
    main()
