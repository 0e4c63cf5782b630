"""Video: how steady, and how fast, side by side in one run.

    python bench/video.py [--update docs/benchmarks.md] [--skip-workers]

* **Flicker.** A pan across a shipped photo (12 frames at 256 px, 150 iterations), styled
  three ways on the default backbone: every frame on its own (from the photo, the job's
  iterations), the temporal method in one run (Ruder et al.: each frame from the previous
  one warped, with the temporal loss), and the same cut into runs of 6 with 2 seam frames,
  as the workers run it. Flicker is the warping error (worker/flow.py): the mean squared difference
  between each frame and the previous one warped onto it, on the pixels the source's flow
  can follow, given relative to the source clip's own.
* **One worker against two.** A 48-frame clip (128 px, 100 iterations) through the
  service, real worker processes, from submit to the MP4: one worker (two torch threads),
  then two (one thread each), on this machine's cores.
* **Frames per minute per worker** at 256 and 512 px with the default iterations, a run of
  4 frames (its first frame makes the full pyramid, the others half the iterations).

Writes ``docs/video-still.png`` (the same frame, alone and steady, with the source) and
``bench/results/video.json``; ``--update`` replaces the "video" section of the Markdown file.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.report import bench_settings, machine, start_workers, stop, update_section, wait  # noqa: E402
from shared.normalize import check_options  # noqa: E402
from shared.parts import FrameRun, cut  # noqa: E402
from shared.presets import presets  # noqa: E402
from shared.video import decode_frames, pan_clip, read_frames  # noqa: E402
from worker.engine import stylize  # noqa: E402
from worker.flow import as_array, as_image, motion, warp, warping_error  # noqa: E402
from worker.video import stylize_frames  # noqa: E402

PHOTO = REPO / "examples" / "chelsea.jpg"
ENDED = ("succeeded", "failed")
FLICKER_FRAMES, FLICKER_ITERATIONS = 12, 150


def flicker(size: int, frames: int, iterations: int) -> tuple[dict[str, float], list[Image.Image]]:
    style = Image.open(presets()["starry-night"].path).convert("RGB")
    shape = (size, size * 2 // 3)
    clip = pan_clip(Image.open(PHOTO), frames=frames, size=shape, fps=12, step=3)
    sources = read_frames(clip, 0, frames, shape)
    arrays = [as_array(frame) for frame in sources]
    own = warping_error(arrays, arrays)
    options = check_options(size=size, iterations=iterations, seed=1, styles=1)
    results: dict[str, float] = {"source": own}
    started = time.perf_counter()
    alone = [stylize(content=frame, styles=[style], size=size, iterations=iterations,
                     seed=1).image for frame in sources]  # fmt: skip
    results["alone_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    steady = [f.result.image for f in stylize_frames(
        sources, first_index=0, styles=[style], style_weights=[1.0], options=options)]  # fmt: skip
    results["steady_seconds"] = time.perf_counter() - started
    runs = cut(frames, 6, 2)
    pictures: dict[int, list[Image.Image]] = {}
    for run in runs:
        made = stylize_frames(sources[run.first : run.stop], first_index=run.first,
                              styles=[style], style_weights=[1.0], options=options)  # fmt: skip
        for frame in made:
            pictures.setdefault(frame.index, []).append(frame.result.image)
    seamed = [_blend(index, pictures[index], runs) for index in range(frames)]
    for name, made in (("alone", alone), ("steady", steady), ("seams", seamed)):
        results[name] = warping_error([as_array(p) for p in made], arrays) / own
    middle = frames // 2
    step = motion(arrays[middle], arrays[middle + 1])
    panels = [sources[middle + 1], alone[middle + 1], steady[middle + 1]]
    for made in (alone, steady):  # what changed from frame t to t+1, beyond the motion
        moved = warp(as_array(made[middle]), step.backward)
        change = np.abs(as_array(made[middle + 1]) - moved) * step.weights[..., None]
        panels.append(as_image(np.clip(change * 4, 0, 1)))
    return results, panels


def _blend(index: int, made: list[Image.Image], runs: list[FrameRun]) -> Image.Image:
    from worker.parts import seam_weight

    if len(made) == 1:
        return made[0]
    later = next(run for run in runs if run.first <= index < run.start)
    return Image.blend(made[0], made[1], seam_weight(index, later.start, later.overlap))


def still(frames: list[Image.Image], path: Path) -> None:
    """Frame t+1 of the source, alone and steady, then what changed from frame t (warped by
    the flow) to t+1, alone and steady, on the pixels the flow follows (×4): the flicker."""
    width, height = frames[0].size
    labels = ["source", "alone", "steady", "alone: change from t (x4)",
              "steady: change from t (x4)"]  # fmt: skip
    sheet = Image.new("RGB", (width * len(frames), height + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        sheet.paste(frame, (index * width, 20))
        draw.text((index * width + 4, 4), label, fill="black")
    sheet.save(path)


def workers_wall(frames: int, counts: list[int]) -> dict[int, float]:
    """Seconds from submit to the finished MP4 with ``count`` workers."""
    from stylequeue.service import start_embedded_redis
    from web import create_app

    clip = pan_clip(Image.open(PHOTO), frames=frames, size=(192, 128), fps=12, step=2)
    results = {}
    for count in counts:
        with tempfile.TemporaryDirectory() as scratch:
            base = Path(scratch)
            redis_process, redis_url = start_embedded_redis(base)
            settings = bench_settings(base, redis_url, batch_jobs=1, preview_every=0,
                                      fast_previews=False)  # fmt: skip
            threads = str(max(1, 2 // count))
            processes = start_workers(settings, count, base, OMP_NUM_THREADS=threads)
            app = create_app({"SETTINGS": settings})
            try:
                client = app.test_client()
                started = time.perf_counter()
                response = client.post(
                    "/api/jobs",
                    data={"content": (io.BytesIO(clip), "clip.mp4"), "style_preset": "starry-night",
                          "size": "128", "iterations": "100", "seed": "1"},
                    content_type="multipart/form-data",
                )  # fmt: skip
                assert response.status_code == 202, response.get_json()
                url = f"/api/jobs/{response.get_json()['id']}"
                wait(lambda c=client, u=url: c.get(u).get_json()["status"] in ENDED,
                     3600, "the video", every=0.5)  # fmt: skip
                assert client.get(url).get_json()["status"] == "succeeded"
                results[count] = time.perf_counter() - started
                result = client.get(f"{url}/result").data
                assert len(decode_frames(result)) == frames
            finally:
                app.extensions["stylequeue"]["engine"].dispose()
                stop(processes)
                redis_process.terminate()
    return results


def frames_per_minute(size: int, frames: int = 4) -> float:
    style = Image.open(presets()["starry-night"].path).convert("RGB")
    shape = (size, size * 9 // 16)
    sources = read_frames(pan_clip(Image.open(PHOTO), frames=frames, size=shape, step=4), 0,
                          frames, shape)  # fmt: skip
    options = check_options(size=size, seed=1, styles=1)
    started = time.perf_counter()
    for _ in stylize_frames(sources, first_index=0, styles=[style], style_weights=[1.0],
                            options=options):  # fmt: skip
        pass
    return frames / (time.perf_counter() - started) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", type=Path)
    parser.add_argument("--skip-workers", action="store_true")
    parser.add_argument("--flicker-only", action="store_true", help="the flicker and its still")
    args = parser.parse_args()
    cpu = machine()
    results: dict[str, object] = {"machine": cpu}
    steady, stills = flicker(256, FLICKER_FRAMES, FLICKER_ITERATIONS)
    results["flicker"] = steady
    still(stills, REPO / "docs" / "video-still.png")
    print("flicker", steady, flush=True)
    if args.flicker_only:
        return
    if not args.skip_workers:
        results["workers"] = workers_wall(48, [1, 2])
        print("workers", results["workers"], flush=True)
    results["frames_per_minute"] = {size: frames_per_minute(size) for size in (256, 512)}
    print("frames per minute", results["frames_per_minute"], flush=True)
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "video.json").write_text(json.dumps(results, indent=2))
    if args.update:
        print(update_section(args.update, "video", report(results)))


def report(results: dict) -> list[str]:  # type: ignore[type-arg]
    f = results["flicker"]
    lines = [
        f"Measured on {results['machine']} by `python bench/video.py`.",
        "",
        f"Flicker: the warping error of {FLICKER_FRAMES} frames panning across chelsea.jpg at "
        f"256 px (Starry Night, {FLICKER_ITERATIONS} iterations, the default backbone), "
        f"relative to the source's own ({f['source']:.2g}); lower is steadier.",
        "",
        "| frames styled | warping error (× source) | seconds |",
        "|---|---|---|",
        f"| each on its own | {f['alone']:.1f} | {f['alone_seconds']:.0f} |",
        f"| one run, temporal (Ruder et al.) | {f['steady']:.1f} | {f['steady_seconds']:.0f} |",
        f"| runs of 6, 2 seam frames blended (as the workers run it) | {f['seams']:.1f} | – |",
    ]
    if "workers" in results:
        w = results["workers"]
        lines += [
            "",
            "A 48-frame clip (128 px, 100 iterations, runs of 12 with 2 seam frames) from "
            "submit to its MP4, through the service's real workers:",
            "",
            "| workers | seconds | speed-up |",
            "|---|---|---|",
            *(f"| {n} | {s:.0f} | {w[1] / s:.2f}× |" for n, s in w.items()),
        ]
    fpm = results["frames_per_minute"]
    lines += [
        "",
        "Frames per minute on one worker, default options (300 iterations), a run of 4 frames:",
        "",
        "| size | frames per minute |",
        "|---|---|",
        *(f"| {size} px | {value:.1f} |" for size, value in fpm.items()),
    ]
    return lines


if __name__ == "__main__":
    main()
