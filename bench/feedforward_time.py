"""The feed-forward picture's time (worker/feedforward.py) by output size and onnxruntime
threads: the style vector (the predictor) and the transform (the transfer network and the
resizes around it) timed separately, median and p95 over repeated calls after a warm-up,
and the cold start (model files read, checked and loaded, then the first call) in fresh
processes.

    python bench/feedforward_time.py [--sizes 128,256,384,512,768,1024] [--threads 1,2]
        [--repeats 20] [--cold 3] [--out bench/results/feedforward-time.json]

The thread counts are measured interleaved, call by call, in one process on the same
inputs (examples/chelsea.jpg × The Starry Night), so that a load from other processes
falls on both alike. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.report import machine  # noqa: E402
from shared.presets import presets  # noqa: E402
from worker.feedforward import TRANSFORM_SIDE, FeedForward  # noqa: E402

PHOTO = REPO / "examples" / "chelsea.jpg"
PAINTING = "starry-night"

#: Run in a fresh interpreter: what a worker pays the first time it serves a preview.
COLD = """
import json, sys, time
started = time.perf_counter()
import onnxruntime  # noqa: F401
imported = time.perf_counter()
from PIL import Image
from worker.feedforward import FeedForward
photo = Image.open(sys.argv[1]).convert("RGB")
painting = Image.open(sys.argv[2]).convert("RGB")
ready = time.perf_counter()
model = FeedForward(threads=int(sys.argv[3]))
loaded = time.perf_counter()
model.stylize(photo, [painting], size=int(sys.argv[4]))
first = time.perf_counter()
model.stylize(photo, [painting], size=int(sys.argv[4]))
second = time.perf_counter()
print(json.dumps({"import_onnxruntime": imported - started, "load": loaded - ready,
                  "first_call": first - loaded, "second_call": second - first}))
"""


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p95": float(np.percentile(values, 95)),
        "min": min(values),
        "max": max(values),
    }


def cold(threads: int, size: int, painting: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", COLD, str(PHOTO), str(painting), str(threads), str(size)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256,384,512,768,1024")
    parser.add_argument("--threads", default="1,2")
    # 20, not 10: the 95th percentile of ten values is their maximum, nearly.
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cold", type=int, default=3, help="fresh processes per thread count")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "feedforward-time.json"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]

    painting_path = presets()[PAINTING].path
    photo = Image.open(PHOTO).convert("RGB")
    painting = Image.open(painting_path).convert("RGB")

    # Cold starts first, while this process holds no model: fresh interpreters, the thread
    # counts alternating.
    colds: dict[int, list[dict[str, float]]] = {t: [] for t in thread_counts}
    for _ in range(args.cold):
        for threads in thread_counts:
            colds[threads].append(cold(threads, TRANSFORM_SIDE, painting_path))

    models = {threads: FeedForward(threads=threads) for threads in thread_counts}
    for model in models.values():
        for _ in range(args.warmup):
            model.stylize(photo, [painting], size=TRANSFORM_SIDE)

    timings: dict[tuple[int, int], dict[str, list[float]]] = {
        (size, t): {"predict": [], "transform": [], "total": []}
        for size in sizes
        for t in thread_counts
    }
    # Interleaved: each repeat goes through every size and thread count in turn.
    for _ in range(args.repeats):
        for size in sizes:
            for threads, model in models.items():
                started = time.perf_counter()
                vector = model.blend([painting])
                predicted = time.perf_counter()
                model.transform(photo, vector, size)
                done = time.perf_counter()
                entry = timings[(size, threads)]
                entry["predict"].append(predicted - started)
                entry["transform"].append(done - predicted)
                entry["total"].append(done - started)

    rows: list[dict[str, Any]] = [
        {
            "size": size,
            "threads": threads,
            **{part: summary(values) for part, values in timings[(size, threads)].items()},
            "samples": timings[(size, threads)],
        }
        for size in sizes
        for threads in thread_counts
    ]
    cold_summary = {
        str(threads): {part: statistics.median(run[part] for run in runs) for part in runs[0]}
        for threads, runs in colds.items()
    }
    where = machine()
    results = {
        "machine": where,
        "photo": str(PHOTO.relative_to(REPO)),
        "painting": PAINTING,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "cold": {"runs": {str(t): runs for t, runs in colds.items()}, "median": cold_summary},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")

    print(
        f"{where}; {PHOTO.name} × {PAINTING}; median and p95 of {args.repeats} calls after "
        f"{args.warmup} warm-up calls, seconds."
    )
    print()
    print(
        "| output long side | threads | style vector median | p95 | transform median | p95 | "
        "total median | p95 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = " | ".join(
            f"{row[part]['median']:.3f} | {row[part]['p95']:.3f}"
            for part in ("predict", "transform", "total")
        )
        print(f"| {row['size']} px | {row['threads']} | {cells} |")
    print()
    print(f"Cold start at {TRANSFORM_SIDE} px, medians of {args.cold} fresh processes, seconds:")
    print()
    print("| threads | import onnxruntime | load both models | first call | second call |")
    print("|---|---|---|---|---|")
    for threads, c in cold_summary.items():
        print(
            f"| {threads} | {c['import_onnxruntime']:.3f} | {c['load']:.3f} | "
            f"{c['first_call']:.3f} | {c['second_call']:.3f} |"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
