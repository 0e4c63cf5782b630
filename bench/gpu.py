"""The engine on a GPU: is it right there, how fast is a step in fp32, TF32 and bf16 against
the plain fp32 reference, where does a step's time go, and does batching jobs pay.

Not a test. Needs only torch, numpy and pillow (what a GPU machine has), and the engine
(``worker/engine``): no service, no database. ``bench/gpu.sh`` runs it with the sizes and
counts that fit well inside 8 minutes on one H200; ``--device cpu --sizes 64
--profile-sizes 64 --whole-sizes 64 --whole-iterations 40 --evaluations 0 --batch-sizes 64``
checks it anywhere in a few minutes. Every section prints a Markdown table as it goes and
adds to ``--json``, so a run cut short still reports what it finished.

* check: the losses of a CUDA fp32 run against the same run on the CPU (the same objective:
  the first must agree to float rounding), and that a bf16 run's loss falls;
* per step: the reference (``bench/engine.py``'s textbook implementation: fp32, contiguous,
  ``torch.optim.LBFGS``) and the engine's own runs (single scale, L-BFGS, the offline
  backbone ``vgg19-random``: same architecture, same cost) in fp32 (TF32 off), TF32 and
  bf16, median seconds per step after warm-up and ``torch.cuda.max_memory_allocated``; bf16
  again with ``cudnn.benchmark`` (cuDNN times its algorithms for each new shape), and
  without the engine's CUDA graphs (``bf16-eager``);
* where the time goes: a step's kernel time and the CUDA kernels run per step (the torch
  profiler, whose own cost inflates the wall time it shows), and the host synchronisations
  per iteration (``torch.cuda.set_sync_debug_mode``);
* whole runs: 300 iterations with and without the engine's CUDA graphs, early and late
  steps (once L-BFGS's history is full);
* time to the reference's loss at 512 px: the reference runs 300 evaluations; the engine
  (``precision=auto``, its pyramid, then single scale) runs until its output reaches the
  same loss, measured as ``bench/engine.py`` does;
* batching: k runs of one size through ``stylize_together``, as a worker batches k jobs
  (one forward and backward pass for all, an L-BFGS step each), against one run: images
  times iterations per second and the speed-up. ``STYLEQUEUE_BATCH_MAX_SIZE`` should stop
  below the first size where this is not well above 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from engine import (  # bench/engine.py (run as a script)
    IMAGES_HELP,
    ReferenceObjective,
    as_output,
    engine_time_to,
    reference_run,
    sample_pair,
    step_seconds,
    to_tensor,
)
from PIL import Image

from worker.engine import Iterate, prepare, stylize, stylize_together
from worker.engine.backbones import load_backbone

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vgg19-random"
WARMUP = 3  # steps left out of every median: the first pass sets up kernels and caches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_backends(*, tf32: bool, benchmark: bool = False) -> None:
    """``fp32`` means TF32 off for matmuls and convolutions (cuDNN's default allows it)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark


def precision_of(mode: str) -> str:
    return "bf16" if mode.startswith("bf16") else "fp32"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


class Report:
    """The results so far, written to ``path`` after every row."""

    def __init__(self, path: Path | None, device_name: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"device": device_name, "torch": torch.__version__}

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data.setdefault(section, []).append(row)
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=1))


def section(title: str, header: list[str]) -> None:
    print(f"\n## {title}\n\n| {' | '.join(header)} |\n|{'---|' * len(header)}", flush=True)


def row(*cells: object) -> None:
    print(f"| {' | '.join(str(c) for c in cells)} |", flush=True)


# --- The sections ----------------------------------------------------------------------


def check(content: Image.Image, style: Image.Image, device: torch.device, report: Report) -> None:
    """The same run on the CPU and on ``device`` in fp32: the first losses must agree to
    float rounding; later ones drift apart as L-BFGS's long early steps amplify it."""
    section("Check: the same run on the CPU and here", ["iteration", "CPU", "here", "relative"])
    set_backends(tf32=False)
    losses: dict[str, list[float]] = {}
    for where in ("cpu", str(device)):
        seen: list[float] = []
        stylize(
            content=content, styles=[style], size=64, scales=1, iterations=5, backbone=BACKBONE,
            precision="fp32", device=where, progress=lambda it, seen=seen: seen.append(it.loss),
        )  # fmt: skip
        losses[where] = seen
    for index, (cpu, here) in enumerate(zip(losses["cpu"], losses[str(device)], strict=True)):
        relative = abs(here - cpu) / abs(cpu)
        row(index + 1, f"{cpu:.6g}", f"{here:.6g}", f"{relative:.1e}")
        report.add("check", {"iteration": index + 1, "cpu": cpu, "here": here})
    bf16: list[float] = []
    stylize(
        content=content, styles=[style], size=256, scales=1, iterations=30, backbone=BACKBONE,
        precision="bf16", device=str(device), progress=lambda it: bf16.append(it.loss),
    )  # fmt: skip
    print(f"\nbf16 at 256 px: loss {bf16[0]:.4g} → {bf16[-1]:.4g} in 30 iterations", flush=True)
    report.add("check_bf16", {"first": bf16[0], "last": bf16[-1]})


def engine_step(
    content: Image.Image, style: Image.Image, size: int, mode: str, steps: int,
    device: torch.device,
) -> tuple[float, float]:  # fmt: skip
    """Median seconds per engine step after warm-up, and the peak memory."""
    set_backends(tf32=mode == "tf32", benchmark=mode == "bf16+benchmark")
    stamps: list[float] = []

    def record(_: Iterate) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    synchronize(device)
    reset_peak(device)
    stamps.append(time.perf_counter())
    stylize(
        content=content, styles=[style], size=size, scales=1, iterations=steps, tv_weight=0.0,
        backbone=BACKBONE, precision=precision_of(mode), device=str(device), progress=record,
        cuda_graphs=mode != "bf16-eager",
    )  # fmt: skip
    return statistics.median(step_seconds(stamps, WARMUP)), peak_mib(device)


def reference_step(
    content: Image.Image, style: Image.Image, size: int, steps: int, device: torch.device
) -> tuple[float, float]:
    set_backends(tf32=False)
    layers = load_backbone(BACKBONE, device=device).layers
    c, s = to_tensor(content, size).to(device), to_tensor(style, size).to(device)
    objective = ReferenceObjective(layers, c, s)
    reset_peak(device)
    _, stamps = reference_run(objective, c, steps)  # its closure reads the loss: a sync
    return statistics.median(step_seconds(stamps, WARMUP)), peak_mib(device)


def per_step(
    content: Image.Image, style: Image.Image, sizes: list[int], modes: list[str], steps: int,
    device: torch.device, report: Report,
) -> None:  # fmt: skip
    header = ["size", "reference fp32 s/step", *(f"{m} s/step" for m in modes)]
    header += ["best speed-up", "peak MiB (reference / " + " / ".join(modes) + ")"]
    section("Seconds per step, single scale, L-BFGS", header)
    for size in sizes:
        reference, reference_peak = reference_step(content, style, size, steps, device)
        times, peaks = {}, {}
        for mode in modes:
            times[mode], peaks[mode] = engine_step(content, style, size, mode, steps, device)
        best = min(times.values())
        row(size, f"{reference:.4f}", *(f"{times[m]:.4f}" for m in modes),
            f"{reference / best:.1f}×",
            " / ".join(f"{p:.0f}" for p in (reference_peak, *peaks.values())))  # fmt: skip
        report.add("per_step", {"size": size, "reference": reference, "reference_peak_mib":
                                reference_peak, "engine": times, "peak_mib": peaks})  # fmt: skip


def profiled_run(
    content: Image.Image, style: Image.Image, size: int, device: torch.device, profiler: Any
) -> tuple[list[float], list[int]]:
    """A 21-iteration bf16 run with ``profiler`` on over iterations 5-15: the two time
    stamps, and the host synchronisations counted in each iteration after the 16th."""
    stamps: list[float] = []
    syncs: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def record(it: Iterate) -> None:
            if it.iteration > 15:  # syncs since the last callback; no sync of our own
                syncs.append(sum("synchroniz" in str(w.message) for w in caught))
                caught.clear()
                return
            synchronize(device)
            if it.iteration == 5:
                profiler.start()
                stamps.append(time.perf_counter())
            elif it.iteration == 15:
                profiler.stop()
                stamps.append(time.perf_counter())
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                caught.clear()

        try:
            stylize(
                content=content, styles=[style], size=size, scales=1, iterations=21,
                tv_weight=0.0, backbone=BACKBONE, precision="bf16", device=str(device),
                progress=record,
            )  # fmt: skip
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return stamps, syncs


def where_time_goes(
    content: Image.Image, style: Image.Image, sizes: list[int], device: torch.device,
    report: Report,
) -> None:  # fmt: skip
    """bf16 (the engine's choice on a GPU): kernel time and launches per step from the
    profiler over 10 steps, host synchronisations per iteration from the sync debug mode."""
    from torch.profiler import ProfilerActivity, profile

    header = ["size", "wall ms/step", "kernels ms/step", "kernels/step", "syncs/iteration"]
    section("Where a bf16 step's time goes", header)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    set_backends(tf32=False)
    for size in sizes:
        profiler = profile(activities=activities)
        stamps, syncs = profiled_run(content, style, size, device, profiler)
        wall = (stamps[1] - stamps[0]) / 10
        events = profiler.key_averages()
        kernels = [e for e in profiler.events() if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.device_time_total for e in kernels) / 1000 / 10 if kernels else 0.0
        syncs_per_iteration = statistics.median(syncs) if syncs else float("nan")
        row(size, f"{wall * 1000:.2f}", f"{kernel_ms:.2f}", f"{len(kernels) / 10:.0f}",
            f"{syncs_per_iteration:.0f}")  # fmt: skip
        report.add("time_goes", {"size": size, "wall_ms": wall * 1000, "kernel_ms": kernel_ms,
                                 "kernels_per_step": len(kernels) / 10,
                                 "syncs_per_iteration": syncs_per_iteration})  # fmt: skip
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n{size} px, top ops over 10 steps:\n```\n"
              f"{events.table(sort_by=sort_by, row_limit=12, max_name_column_width=48)}\n```",
              flush=True)  # fmt: skip


def whole_runs(
    content: Image.Image, style: Image.Image, sizes: list[int], iterations: int,
    device: torch.device, report: Report,
) -> None:  # fmt: skip
    """Whole single-scale runs in bf16, graphs on and off: the L-BFGS history (100 pairs)
    fills over the first 100 steps, and each pair costs the two-loop recursion 7 kernels."""
    section(f"Whole runs: {iterations} iterations, bf16, single scale",
            ["size", "graphs", "seconds", "ms/step, steps 4-30", "ms/step, last 50"])  # fmt: skip
    set_backends(tf32=False)
    for size, graphs in itertools.product(sizes, (True, False)):
        stamps: list[float] = []

        def record(_: Iterate, stamps: list[float] = stamps) -> None:
            synchronize(device)
            stamps.append(time.perf_counter())

        synchronize(device)
        stamps.append(time.perf_counter())
        stylize(
            content=content, styles=[style], size=size, scales=1, iterations=iterations,
            backbone=BACKBONE, precision="bf16", device=str(device), progress=record,
            cuda_graphs=graphs,
        )  # fmt: skip
        gaps = step_seconds(stamps, 0)
        early, late = statistics.median(gaps[3:30]), statistics.median(gaps[-50:])
        row(size, "on" if graphs else "off", f"{stamps[-1] - stamps[0]:.2f}",
            f"{early * 1000:.2f}", f"{late * 1000:.2f}")  # fmt: skip
        report.add("whole_runs", {"size": size, "graphs": graphs, "seconds": stamps[-1] -
                                  stamps[0], "early": early, "late": late})  # fmt: skip


def time_to_reference(
    content: Image.Image, style: Image.Image, device: torch.device, evaluations: int,
    report: Report,
) -> None:  # fmt: skip
    size = 512
    section(f"Time to the reference's {evaluations}-evaluation loss at {size} px",
            ["run", "seconds", "sooner", "iterations"])  # fmt: skip
    set_backends(tf32=False)
    layers = load_backbone(BACKBONE, device=device).layers
    c, s = to_tensor(content, size).to(device), to_tensor(style, size).to(device)
    objective = ReferenceObjective(layers, c, s)
    final, stamps = reference_run(objective, c, evaluations)
    reference_time = stamps[-1] - stamps[0]

    def measure(image: Image.Image | torch.Tensor) -> float:
        tensor = image if isinstance(image, torch.Tensor) else to_tensor(image, size)
        with torch.no_grad():
            return float(objective(as_output(tensor.to(device))))

    target = measure(final)
    row(f"reference fp32, {evaluations} evaluations", f"{reference_time:.2f}", "1×", evaluations)
    report.add("time_to", {"run": "reference", "seconds": reference_time, "loss": target})
    for label, scales in (("engine auto, pyramid", None), ("engine auto, single scale", 1)):
        reached, last, iterations = engine_time_to(
            content, style, [target], measure, size=size, scales=scales, backbone=BACKBONE,
            budget=evaluations, check_every=5, device=str(device),
        )  # fmt: skip
        seconds = reached[0]
        cells = ("not reached", "–") if seconds is None else (
            f"{seconds:.2f}", f"{reference_time / seconds:.1f}×")  # fmt: skip
        row(label, *cells, iterations)
        report.add("time_to", {"run": label, "seconds": seconds, "last_loss": last,
                               "iterations": iterations})  # fmt: skip


def batched(
    content: Image.Image, style: Image.Image, size: int, batch: int, mode: str, steps: int,
    device: torch.device,
) -> float:  # fmt: skip
    """Image-iterations per second of ``batch`` runs through :func:`stylize_together`, as a
    worker batches jobs (single scale, L-BFGS each, one seed each), after warm-up."""
    set_backends(tf32=mode == "tf32")
    stamps: list[float] = []

    def record(_: Iterate) -> None:  # the first run's callback: once per batched iteration
        synchronize(device)
        stamps.append(time.perf_counter())

    runs = [
        prepare(content=content, styles=[style], size=size, scales=1, iterations=steps,
                backbone=BACKBONE, precision=precision_of(mode), device=str(device),
                seed=index, progress=record if index == 0 else None)
        for index in range(batch)
    ]  # fmt: skip
    stylize_together(runs)
    return batch / statistics.median(step_seconds(stamps, WARMUP))


def batching(
    content: Image.Image, style: Image.Image, sizes: list[int], batches: list[int],
    modes: list[str], steps: int, device: torch.device, report: Report,
) -> None:  # fmt: skip
    section("Batching: image-iterations per second, k runs as one batch",
            ["size", "mode", *(f"k = {k}" for k in batches), "best vs k = 1"])  # fmt: skip
    for size, mode in itertools.product(sizes, modes):
        rates = {k: batched(content, style, size, k, mode, steps, device) for k in batches}
        single = rates[batches[0]]
        row(size, mode, *(f"{r:.1f} ({r / single:.2f}×)" for r in rates.values()),
            f"{max(rates.values()) / single:.2f}×")  # fmt: skip
        report.add("batching", {"size": size, "mode": mode,
                                "image_iterations_per_second": rates})  # fmt: skip


def plot(results: Path, png: Path) -> None:
    """Seconds per step against the image size from a ``--json`` file, log-log."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    rows = data["per_step"]
    sizes = [row["size"] for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot(sizes, [row["reference"] * 1000 for row in rows], "k--o", label="reference fp32")
    for mode in rows[0]["engine"]:
        axes.plot(sizes, [row["engine"][mode] * 1000 for row in rows], "-o", label=mode)
    axes.set(xscale="log", yscale="log", xlabel="long side (px)", ylabel="ms per step",
             title=f"{data['device']}: time per step, single scale, L-BFGS")  # fmt: skip
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_yticks([3, 5, 10, 20, 50], ["3", "5", "10", "20", "50"])
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=Path, help=IMAGES_HELP)
    parser.add_argument("--sizes", default="128,256,512,1024")
    parser.add_argument("--modes", default="fp32,tf32,bf16,bf16+benchmark,bf16-eager")
    parser.add_argument("--whole-sizes", default="128,512", help="sizes of whole runs")
    parser.add_argument("--whole-iterations", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-sizes", default="128,512")
    parser.add_argument(
        "--evaluations", type=int, default=300, help="for the time to loss; 0: skip"
    )
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument(
        "--batch-sizes", default="128,256,512,1024", help="image sizes for batching"
    )
    parser.add_argument("--batch-modes", default="bf16,tf32")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("JSON", "PNG"),
                        help="only plot the per-step figures of an earlier --json")  # fmt: skip
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    report = Report(args.json, name)
    content, style = sample_pair(args.images)

    sections: list[tuple[str, Callable[[], None]]] = [
        ("check", lambda: check(content, style, device, report)),
        ("per step", lambda: per_step(content, style, ints(args.sizes),
                                      args.modes.split(","), args.steps, device, report)),
        ("time goes", lambda: where_time_goes(content, style, ints(args.profile_sizes),
                                              device, report)),
        ("whole runs", lambda: whole_runs(content, style, ints(args.whole_sizes),
                                          args.whole_iterations, device, report)),
        ("time to loss", lambda: time_to_reference(content, style, device, args.evaluations,
                                                   report) if args.evaluations else None),
        ("batching", lambda: batching(content, style, ints(args.batch_sizes), ints(args.batches),
                                      args.batch_modes.split(","), args.steps, device, report)),
    ]  # fmt: skip
    for title, run in sections:  # one failing section does not cost the others
        begin = time.perf_counter()
        try:
            run()
        except Exception:
            print(f"\n{title} failed:\n```\n{traceback.format_exc()}```", flush=True)
            report.add("failed", {"section": title, "error": traceback.format_exc()})
        print(f"\n({title}: {time.perf_counter() - begin:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
