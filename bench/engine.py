"""Engine benchmark: the engine against a plain textbook reference, side by side, one run.

Not a test: it prints and writes ``docs/benchmarks.md``. Both sides use the same backbone
weights (``vgg19-random`` unless ``--backbone`` names one whose weights are installed), the
same layers and the same loss weights, so they minimize the same objective:

* per step: seconds per optimizer step at 128 to 1024 px, single scale, for the reference
  (fp32, contiguous, ``torch.optim.LBFGS``) and for the engine with ``precision="auto"``,
  beside the backbone alone at that precision against fp32 (the ceiling precision allows);
* time to the reference's loss: the reference runs 300 L-BFGS evaluations at 512 px; the
  engine, with its own pyramid and precision, runs until its output reaches the same loss.
  Both losses are measured on the output image (clamped, 8-bit, what a user gets) with the
  reference's objective in fp32 at full size; the time the engine spends on those checks is
  not counted.

Usage: ``python bench/engine.py [--steps 300] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from report import update_section  # bench/report.py (run as a script)
from torch import nn

from worker.engine import Iterate, stylize
from worker.engine.backbones import load_backbone
from worker.engine.device import cpu_has_fast_bf16, load_extractor, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
CONTENT_WEIGHT, STYLE_WEIGHT = 1.0, 1e6
#: Per-step figures come from this many alternating runs of each side.
ROUNDS = 3


# --- The reference: the textbook implementation (PyTorch tutorial shape), fp32 -----------


def reference_gram(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    f = x.view(b * c, h * w)
    return f @ f.t() / (b * c * h * w)


class ReferenceObjective:
    """VGG layers run one by one; MSE on relu4_2 and on the Grams of relu1_1..relu5_1."""

    def __init__(self, layers: nn.Sequential, content: torch.Tensor, style: torch.Tensor) -> None:
        names = [name for name, _ in layers.named_children()]
        last = max(names.index(n) for n in [CONTENT_LAYER, *STYLE_LAYERS])
        self.layers = nn.Sequential(*list(layers.children())[: last + 1])
        self.names = names[: last + 1]
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=content.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=content.device).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = self.features(content)
            self.content_target = feats[CONTENT_LAYER]
            style_feats = self.features(style)
            self.style_targets = {n: reference_gram(style_feats[n]) for n in STYLE_LAYERS}

    def features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (image - self.mean) / self.std
        out = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            x = layer(x)
            out[name] = x
        return out

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.features(image)
        content = F.mse_loss(feats[CONTENT_LAYER], self.content_target)
        style = sum(
            F.mse_loss(reference_gram(feats[n]), self.style_targets[n]) / len(STYLE_LAYERS)
            for n in STYLE_LAYERS
        )
        return CONTENT_WEIGHT * content + STYLE_WEIGHT * style


IMAGES_HELP = (
    "a folder with content/tubingen.jpg and style/starry_night.jpg (default: the "
    "repository's examples/chelsea.jpg and its Starry Night preset)"
)


def sample_pair(images: Path | None) -> tuple[Image.Image, Image.Image]:
    """A photo and a painting: from ``images`` (``--images``) if given, else the
    repository's own. A step's cost depends on the size, not on what the images show."""
    if images is None:
        paths = [
            ROOT / "examples" / "chelsea.jpg",
            ROOT / "shared" / "presets" / "starry-night.jpg",
        ]
    else:
        paths = [images / "content" / "tubingen.jpg", images / "style" / "starry_night.jpg"]
    content, style = (Image.open(path).convert("RGB") for path in paths)
    return content, style


def to_tensor(image: Image.Image, long_side: int) -> torch.Tensor:
    scale = long_side / max(image.size)
    size = (round(image.size[0] * scale), round(image.size[1] * scale))
    array = np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def as_output(image: torch.Tensor) -> torch.Tensor:
    """What a user gets: clamped to [0, 1] and rounded to 8 bits."""
    return image.detach().clamp(0, 1).mul(255).round().div(255)


def reference_run(
    objective: ReferenceObjective,
    content: torch.Tensor,
    evaluations: int,
    losses: list[float] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Run the reference; the time stamp after each evaluation (and, into ``losses``, the
    loss its optimizer saw: a float the closure returns anyway, no extra work)."""
    image = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([image], max_iter=evaluations, max_eval=evaluations)
    stamps: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(image)
        loss.backward()
        stamps.append(time.perf_counter())
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss

    stamps.append(time.perf_counter())
    optimizer.step(closure)
    return image.detach(), stamps


def step_seconds(stamps: list[float], warmup: int = 2) -> list[float]:
    """The seconds each step took, after ``warmup`` steps."""
    return [float(gap) for gap in np.diff(stamps)[warmup:]]


# --- The runs ------------------------------------------------------------------------------


def backbone_ceiling(backbone: str, image: torch.Tensor, samples: int) -> float:
    """How much faster the backbone alone runs (forward and backward to relu5_1, no Grams,
    no optimizer) at the engine's precision than in fp32: the most any per-step speed-up
    from precision can reach here. The two alternate, so drift hits both alike."""
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    lower = precision != "fp32"

    def timed(extractor: nn.Module, low_precision: bool) -> Callable[[], float]:
        def step() -> float:
            begin = time.perf_counter()
            x = image.clone().requires_grad_(True)
            if low_precision:  # as the engine runs it
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision):
                out = extractor(x, ["relu5_1"])["relu5_1"]
            out.float().square().mean().backward()
            return time.perf_counter() - begin

        return step

    sides = {
        "fp32": timed(load_extractor(backbone, device=cpu, precision="fp32"), False),
        "engine": timed(load_extractor(backbone, device=cpu, precision=precision), lower),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(samples + 1):  # the first round warms up
        for name, step in sides.items():
            times[name].append(step())
    return float(np.median(times["fp32"][1:]) / np.median(times["engine"][1:]))


def engine_steps(
    content: Image.Image, style: Image.Image, size: int, steps: int, backbone: str
) -> list[float]:
    stamps: list[float] = []

    def record(_: Iterate) -> None:
        stamps.append(time.perf_counter())

    stamps.append(time.perf_counter())
    stylize(
        content=content, styles=[style], size=size, scales=1, iterations=steps,
        tv_weight=0.0, backbone=backbone, progress=record, device="cpu",
    )  # fmt: skip
    return step_seconds(stamps)


def engine_time_to(
    content: Image.Image,
    style: Image.Image,
    targets: list[float],
    measure: Callable[[Image.Image], float],
    *,
    size: int,
    scales: int | None,
    backbone: str,
    budget: int,
    check_every: int,
    trace: list[tuple[float, float]] | None = None,
    device: str = "cpu",
) -> tuple[list[float | None], float, int]:
    """Engine seconds until its output first reaches each of ``targets`` (None: never),
    its last measured loss and the iterations it ran. Stops once all are reached.
    ``trace`` receives (engine seconds, output loss) at every check."""
    spent_checking = 0.0  # the measuring is ours, not the engine's: it is not counted
    reached: list[float | None] = [None] * len(targets)
    last = float("inf")
    iterations = 0

    def check(it: Iterate) -> bool:
        nonlocal spent_checking, last, iterations
        iterations = it.iteration
        if it.preview is None or it.scale != it.scales - 1:
            return False
        engine_time = it.elapsed - spent_checking
        begin = time.perf_counter()
        last = measure(it.preview)
        spent_checking += time.perf_counter() - begin
        if trace is not None:
            trace.append((engine_time, last))
        for index, target in enumerate(targets):
            if reached[index] is None and last <= target:
                reached[index] = engine_time
        return all(t is not None for t in reached)

    stylize(
        content=content, styles=[style], size=size, scales=scales, iterations=budget,
        tv_weight=0.0, backbone=backbone, progress=check, preview_every=check_every,
        device=device,
    )  # fmt: skip
    return reached, last, iterations


def memory_probe(side: str, size: int, steps: int, backbone: str, images: Path) -> None:
    """In a fresh process: the peak resident memory a run of ``steps`` steps adds, beyond the
    process with the backbone loaded and the images decoded (printed as MiB). Resident
    memory is sampled every 2 ms (the process's lifetime peak would be the loading's)."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    peak = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.wait(0.002):
            peak = max(peak, resident())

    content = Image.open(images / "content" / "tubingen.jpg").convert("RGB")
    style = Image.open(images / "style" / "starry_night.jpg").convert("RGB")
    cpu = torch.device("cpu")
    layers = load_backbone(backbone, device=cpu).layers
    load_extractor(backbone, device=cpu, precision=resolve_precision("auto", cpu))  # cached
    if side == "reference":
        c, s = to_tensor(content, size), to_tensor(style, size)
        objective = ReferenceObjective(layers, c, s)
    # Warm up at 32 px first: thread pools and kernels' scratch, which every run pays once.
    if side == "reference":
        small = to_tensor(content, 32)
        reference_run(ReferenceObjective(layers, small, to_tensor(style, 32)), small, 2)
    else:
        engine_steps(content, style, 32, 2, backbone)
    before = peak = resident()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if side == "reference":
        reference_run(objective, c, steps)
    else:
        engine_steps(content, style, size, steps, backbone)
    sampling.set()
    sampler.join()
    print((peak - before) / 2**20)


def allocator_probe(setting: str, size: int, steps: int, backbone: str, images: Path) -> None:
    """In a fresh process: the engine's median seconds per step, with the worker's malloc
    setting (``keep``, worker/allocator.py) or glibc's defaults (``plain``)."""
    from worker.allocator import keep_freed_memory

    if setting == "keep" and not keep_freed_memory():
        raise SystemExit("glibc's mallopt is not available here")
    content = Image.open(images / "content" / "tubingen.jpg").convert("RGB")
    style = Image.open(images / "style" / "starry_night.jpg").convert("RGB")
    print(float(np.median(engine_steps(content, style, size, steps + 2, backbone))))


def allocator_seconds(setting: str, size: int, steps: int, backbone: str, images: Path) -> float:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, __file__, "--allocator-probe", setting, str(size), "--probe-steps",
         str(steps), "--backbone", backbone, *(["--images", str(images)] if images else [])],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def peak_memory_mib(side: str, size: int, steps: int, backbone: str, images: Path) -> float:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, __file__, "--memory-probe", side, str(size), "--probe-steps",
         str(steps), "--backbone", backbone, *(["--images", str(images)] if images else [])],
        capture_output=True, text=True, check=True, cwd=ROOT,
        # Large blocks straight from mmap, so that freed tensors leave the resident set and
        # the sampled peak is what the run held, not what malloc kept from earlier.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def plots(
    out_dir: Path,
    rows: list[tuple[int, float, float]],
    memory: list[tuple[int, int, float, float]],
    reference_trace: list[tuple[float, float]],
    engine_traces: list[tuple[str, list[tuple[float, float]]]],
) -> list[str]:
    """PNG plots next to the Markdown; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    pixels = [p for _, p, _, _ in memory]
    sizes = {size: p for size, p, _, _ in memory}
    left.loglog(
        [sizes[s] for s, _, _ in rows], [r for _, r, _ in rows], "o-", label="reference fp32"
    )
    left.loglog(
        [sizes[s] for s, _, _ in rows], [e for _, _, e in rows], "o-", label="engine (auto)"
    )
    left.set(xlabel="pixels", ylabel="seconds per step", title="Time per step")
    left.legend()
    right.loglog(pixels, [m for _, _, m, _ in memory], "o-", label="reference fp32")
    right.loglog(pixels, [m for _, _, _, m in memory], "o-", label="engine (auto)")
    right.set(xlabel="pixels", ylabel="peak MiB added", title="Peak memory of a run")
    right.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "engine-scaling.png", dpi=110)
    names.append("engine-scaling.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.semilogy(*zip(*reference_trace, strict=True), label="reference: its optimizer's loss")
    for label, trace in engine_traces:
        axis.semilogy(*zip(*trace, strict=True), label=f"engine, {label}: output loss")
    axis.set(xlabel="seconds", ylabel="loss (reference objective, 512 px)",
             title="Loss against time at 512 px")  # fmt: skip
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "loss-vs-time.png", dpi=110)
    names.append("loss-vs-time.png")
    plt.close(figure)
    return names


def goal_lines(
    rows: list[tuple[int, float, float]],
    ceilings: list[float],
    reference_time: float,
    reached: list[list[float | None]],
    precision: str,
) -> list[str]:
    """The issue's goals on this CPU: per step ≥ 5× faster; the reference's loss in ≤ 1/10
    of its time."""
    per_step = min(r / e for _, r, e in rows)
    times = [runs[0] for runs in reached if runs[0] is not None]
    best = reference_time / min(times) if times else 0.0
    lines = [
        f"- Per step ≥ 5× faster than the reference: {'met' if per_step >= 5 else 'not met'} "
        f"({per_step:.2f}× at worst).",
        f"- The reference's loss in ≤ 1/10 of its time: {'met' if best >= 10 else 'not met'} "
        f"({best:.1f}× sooner at best).",
    ]
    if per_step < 5 and precision != "fp32":
        amx = "AMX" if Path("/proc/cpuinfo").read_text().count("amx_bf16") else "no AMX"
        lines.append(
            f"- Why per step falls short here: this CPU has {amx}, and with `{precision}` the "
            f"backbone alone, as the engine runs it, is {min(ceilings):.2f}–"
            f"{max(ceilings):.2f}× faster than in fp32 (last column above). The rest of a "
            "step gains less: the Grams and losses stay fp32 by design (only the gradient a "
            "Gram hands back to the backbone is bf16), L-BFGS is the same fp32 arithmetic on "
            "both sides, and in this table both sides pay glibc's page faults (see the "
            "worker's malloc setting)."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help=IMAGES_HELP)
    parser.add_argument("--backbone", default="vgg19-random")
    parser.add_argument("--evaluations", type=int, default=300)
    parser.add_argument("--step-samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--sizes", default="128,256,512,1024")
    parser.add_argument("--memory-probe", nargs=2, metavar=("SIDE", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-steps", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument(
        "--allocator-probe", nargs=2, metavar=("SETTING", "SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_probe:
        side, size = args.memory_probe
        memory_probe(side, int(size), args.probe_steps, args.backbone, args.images)
        return
    if args.allocator_probe:
        setting, size = args.allocator_probe
        allocator_probe(setting, int(size), args.probe_steps, args.backbone, args.images)
        return

    content, style = sample_pair(args.images)
    cpu = torch.device("cpu")
    layers = load_backbone(args.backbone, device=cpu).layers  # the same weights on both sides
    precision = resolve_precision("auto", cpu)

    rows = []
    ceilings: list[float] = []
    memory = []
    for size in map(int, args.sizes.split(",")):
        samples = args.step_samples if size <= 512 else max(3, args.step_samples // 2)
        c, s = to_tensor(content, size), to_tensor(style, size)
        objective = ReferenceObjective(layers, c, s)
        # Alternating runs of a few steps each, so that the machine's drift (tens of
        # percent within minutes here) falls on both sides alike; medians over all steps.
        reference_steps: list[float] = []
        engine_step_times: list[float] = []
        for _ in range(ROUNDS):
            chunk = max(2, -(-samples // ROUNDS))
            reference_steps += step_seconds(reference_run(objective, c, chunk + 2)[1])
            engine_step_times += engine_steps(content, style, size, chunk + 2, args.backbone)
        reference = float(np.median(reference_steps))
        engine = float(np.median(engine_step_times))
        ceiling = backbone_ceiling(args.backbone, c, samples)
        rows.append((size, reference, engine))
        ceilings.append(ceiling)
        print(f"{size} px: reference {reference:.3f} s/step, engine {engine:.3f} s/step, "
              f"{reference / engine:.2f}x; backbone alone {ceiling:.2f}x", flush=True)  # fmt: skip
        pixels = c.shape[-1] * c.shape[-2]
        reference_mib = peak_memory_mib("reference", size, 12, args.backbone, args.images)
        engine_mib = peak_memory_mib("engine", size, 12, args.backbone, args.images)
        memory.append((size, pixels, reference_mib, engine_mib))
        print(f"{size} px: peak memory reference {reference_mib:.0f} MiB, engine "
              f"{engine_mib:.0f} MiB", flush=True)  # fmt: skip

    # The worker's malloc setting, in fresh processes (it is process-wide), alternating.
    allocator_rows = []
    reference_per_step = {size: r for size, r, _ in rows}
    for size in (size for size in (512, 1024) if size in reference_per_step):
        allocator_runs: dict[str, list[float]] = {"plain": [], "keep": []}
        for _ in range(ROUNDS):
            for setting in allocator_runs:
                allocator_runs[setting].append(
                    allocator_seconds(setting, size, 6, args.backbone, args.images)
                )
        plain, keep = (float(np.median(allocator_runs[k])) for k in ("plain", "keep"))
        allocator_rows.append((size, plain, keep, reference_per_step[size]))
        print(f"{size} px: engine {plain:.3f} s/step with glibc's defaults, {keep:.3f} s/step "
              "with the worker's malloc setting", flush=True)  # fmt: skip

    size = 512
    c, s = to_tensor(content, size), to_tensor(style, size)
    objective = ReferenceObjective(layers, c, s)
    reference_losses: list[float] = []
    final, stamps = reference_run(objective, c, args.evaluations, reference_losses)
    reference_time = stamps[-1] - stamps[0]
    reference_trace = [
        (t - stamps[0], loss) for t, loss in zip(stamps[1:], reference_losses, strict=True)
    ]

    def measure(image: Image.Image | torch.Tensor) -> float:
        tensor = image if isinstance(image, torch.Tensor) else to_tensor(image, size)
        with torch.no_grad():
            return float(objective(as_output(tensor)))

    with torch.no_grad():
        raw_loss = float(objective(final))
    output_loss = measure(final)
    print(f"reference: {args.evaluations} evaluations in {reference_time:.1f} s, output loss "
          f"{output_loss:.5g}, optimizer's loss {raw_loss:.5g}", flush=True)  # fmt: skip
    targets = [output_loss, raw_loss]
    runs = []
    traces = []
    for label, scales in (("auto pyramid", None), ("single scale", 1)):
        trace: list[tuple[float, float]] = []
        reached, last, iterations = engine_time_to(
            content, style, targets, measure, size=size, scales=scales,
            backbone=args.backbone, budget=args.evaluations, check_every=5, trace=trace,
        )  # fmt: skip
        runs.append((label, reached, last, iterations))
        traces.append((label, trace))
        print(f"engine, {label}: reached {reached} s, last loss {last:.5g} after {iterations} "
              "iterations", flush=True)  # fmt: skip

    def cell(seconds: float | None) -> str:
        if seconds is None:
            return "not reached"
        return f"{seconds:.1f} s ({reference_time / seconds:.1f}× sooner)"

    lines = [
        "## Engine against a textbook reference",
        "",
        f"Measured by `python bench/engine.py` on {time.strftime('%Y-%m-%d')}: "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, backbone `{args.backbone}`. Native bf16 (AMX or AVX512-BF16): "
        f"{'yes' if cpu_has_fast_bf16() else 'no'}, so `precision=auto` is `{precision}`. "
        "Both sides run in the same process, one after the other, on the same images "
        "(tubingen.jpg, starry_night.jpg), weights, layers and loss weights (content 1, "
        "style 1e6, TV 0); the figures to compare are the ratios.",
        "",
        "The reference is the textbook implementation written in the bench: fp32, contiguous "
        "memory, one scale, `torch.optim.LBFGS` over unconstrained pixels (as Gatys et al.).",
        "",
        "## Seconds per step (single scale, L-BFGS, one loss evaluation per step)",
        "",
        f"Medians over {ROUNDS} alternating runs of each side (the machine drifts by tens of "
        "percent within minutes). The last column is the backbone by itself (forward and "
        "backward to relu5_1, no Grams, no optimizer) as the engine runs it (its precision; "
        "at bf16 on the CPU, packed convolutions) against fp32, alternating, median.",
        "",
        "| size (long side) | reference fp32 | engine `precision=auto` | speed-up | "
        "backbone alone |",
        "|---|---|---|---|---|",
        *(
            f"| {sz} px | {r:.3f} s | {e:.3f} s | {r / e:.2f}× | {ceiling:.2f}× |"
            for (sz, r, e), ceiling in zip(rows, ceilings, strict=True)
        ),
        "",
        "## The worker's malloc setting",
        "",
        "Workers and `stylequeue run` keep freed blocks in glibc's heap for the next "
        "evaluation (worker/allocator.py); the table above runs with glibc's defaults, as "
        f"the reference does. Here the engine runs {ROUNDS} times each way, alternating, in "
        "fresh processes (the setting is process-wide): median seconds per step. The last "
        "column sets the reference's figure from the table above against the engine as a "
        "worker runs it.",
        "",
        "| size | engine, glibc's defaults | engine, worker setting | gain | reference fp32 "
        "against the worker |",
        "|---|---|---|---|---|",
        *(
            f"| {sz} px | {plain:.3f} s | {keep:.3f} s | {plain / keep:.2f}× | {r / keep:.2f}× |"
            for sz, plain, keep, r in allocator_rows
        ),
        "",
        "## How time and memory grow with pixels",
        "",
        "Peak memory: the resident memory a 12-step run adds to a process that has the "
        "backbone loaded (each measured in a fresh process; L-BFGS keeps up to 100 steps of "
        "history, so longer runs add about 2.4 KB per pixel more). Per-pixel figures "
        "staying flat as the image grows means linear growth.",
        "",
        "| size | pixels | reference s/step per Mpx | engine s/step per Mpx | reference MiB | "
        "engine MiB | reference KB/px | engine KB/px |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {sz} px | {px:,} | {r / px * 1e6:.2f} | {e / px * 1e6:.2f} | {rm:.0f} | {em:.0f} "
            f"| {rm * 1024 / px:.2f} | {em * 1024 / px:.2f} |"
            for (sz, r, e), (_, px, rm, em) in zip(rows, memory, strict=True)
        ),
        "",
        "![time and memory against pixels](engine-scaling.png)",
        "",
        f"## Time to the reference's loss after {args.evaluations} evaluations at 512 px",
        "",
        f"The reference took {reference_time:.1f} s. Losses are the reference's objective in "
        "fp32 at 512 px. *Output loss* is measured on the image a user gets (clamped to "
        "[0, 1], 8-bit): the target the issue sets. The reference's pixels drift outside "
        "[0, 1], so its output loss is well above the loss its optimizer reports; the second "
        "column uses that lower figure as a stricter target. The engine keeps pixels in "
        "[0, 1] (projected L-BFGS), so its two losses agree. Time spent measuring the "
        "engine's loss is not counted.",
        "",
        f"| engine run (budget {args.evaluations} iterations) | to the output loss "
        f"{output_loss:.4g} | to the optimizer's loss {raw_loss:.4g} | last loss | iterations |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {cell(reached[0])} | {cell(reached[1])} | {last:.4g} | {iterations} |"
            for label, reached, last, iterations in runs
        ),
        "",
        "## Against the goals",
        "",
        *goal_lines(
            rows, ceilings, reference_time, [reached for _, reached, _, _ in runs], precision
        ),
        "",
        "![loss against time](loss-vs-time.png)",
        "",
    ]
    plots(args.out.parent, rows, memory, reference_trace, traces)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Its own section of the page, under the page's first heading level.
    section = [line.replace("## ", "### ", 1) if line.startswith("## ") else line
               for line in lines]  # fmt: skip
    section[0] = lines[0]
    update_section(args.out, "engine", section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
