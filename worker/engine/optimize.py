"""The optimization loop behind :func:`worker.engine.stylize.stylize`."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.errors import OptionError
from worker.engine.backbones import FeatureExtractor, Pooling, load_backbone
from worker.engine.checkpoint import Checkpoint
from worker.engine.imaging import (
    keep_original_colors,
    match_luminance,
    resize_to,
    to_pil,
    to_tensor,
)
from worker.engine.lbfgs import LBFGS
from worker.engine.losses import (
    ContentLoss,
    StyleLoss,
    TotalVariationLoss,
    blend_grams,
    gram_matrix,
)
from worker.engine.registry import BACKBONES
from worker.engine.stylize import (
    Iterate,
    PreparedRun,
    Result,
    ResultCallback,
    lbfgs_history_for,
    pyramid,
    style_side,
)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: L-BFGS's trust region: the most a pixel (in [0, 1]) may move in one step. Unbounded, the
#: first steps of a scale (and of a resumed run: its history starts empty) can throw pixels
#: to the box's walls and the loss rises before it falls (far more with Gatys et al.'s raw
#: errors than with the relative ones); 0.25 keeps every scale's start falling and
#: reaches the same final loss (bench/scale_start.py, docs/benchmarks.md "Scale starts").
LBFGS_MAX_STEP: float | None = 0.25
#: What an fp16 run multiplies its loss by before backward (and its image's gradient by the
#: inverse after), at most. Under fp16 autocast the backbone's gradients are fp16, whose
#: smallest normal number is 6e-5: the content term's gradient, 2(X - T)/(N·mean T²) with N
#: the features of its layer, is subnormal all through the backbone already at 128 px
#: (vgg19-random, weight 1). In a content-only run at 64 px weighted 2⁻⁸ (as if N were that
#: of 1024 px) the image's gradient was 34 % off fp32's, weighted 2⁻¹² all zeros; scaled,
#: 6 % off (fp16's rounding) at every weight. A power of two, so the scaling and unscaling
#: are exact. bf16 has fp32's range and runs unscaled.
FP16_LOSS_SCALE = 2.0**12
#: The most the scaled loss may be: for larger losses the factor is cut by powers of two
#: (below 1 past 2²⁰ itself).
#: The losses are relative (losses.relative_scale), O(1)-O(100) at the usual weights, but a
#: style_weight of 3000 from noise at 64 px (a loss of 8500) overflowed fp16's 65504 in the
#: gradients at the full 2¹² (2800 did not); 2²⁰ leaves a factor of 8 below that.
FP16_SCALED_LOSS_MAX = 2.0**20


def loss_scale(autocast_dtype: torch.dtype | None) -> float:
    """The largest factor :func:`scaled_backward` takes for runs in ``autocast_dtype``."""
    return FP16_LOSS_SCALE if autocast_dtype == torch.float16 else 1.0


def scaled_backward(loss: torch.Tensor, params: Sequence[torch.Tensor], scale: float) -> None:
    """``loss.backward()`` with ``loss`` times a power of two, ``scale`` or less so that the
    scaled loss stays under FP16_SCALED_LOSS_MAX, and each param's gradient divided by it
    after: what the optimizers read in ``grad`` is the gradient of ``loss`` itself. The
    factor is chosen on the device (no host sync), so a CUDA graph captures it all."""
    if scale == 1.0:
        loss.backward()
        return
    with torch.no_grad():
        room = math.log2(FP16_SCALED_LOSS_MAX) - torch.log2(loss.detach().float()).ceil()
        factor = torch.exp2(room.clamp(max=math.log2(scale)))  # a loss of 0: the full scale
    (loss * factor).backward()
    for param in params:
        assert param.grad is not None
        param.grad.div_(factor)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; anything else must be a usable torch device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"not a torch device: {name!r}", field="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("CUDA was asked for but is not available here", field="device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError("MPS was asked for but is not available here", field="device")
    return device


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Elsewhere oneDNN emulates bf16, which is slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        # Native bf16 only (Ampere and later): torch's default also counts emulated bf16,
        # which T4 and V100 class cards would run slower than fp16.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return "bf16" if native else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def load_extractor(
    name: str, *, device: torch.device, precision: str, pooling: Pooling = "max"
) -> FeatureExtractor:
    """The backbone as the engine runs it at ``precision`` (cached once per process).

    Lower precisions run under autocast with weights stored in autocast's dtype and
    activations in channels_last, the layout oneDNN's bf16 kernels and cuDNN's tensor cores
    want.
    """
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    return load_backbone(
        name,
        device=device,
        pooling=pooling,
        dtype=autocast_dtype or torch.float32,
        channels_last=autocast_dtype is not None,
    )


@dataclass
class Objective:
    """The loss terms of one pyramid scale, with their targets computed once."""

    extractor: FeatureExtractor
    content_losses: dict[str, ContentLoss]
    style_losses: dict[str, tuple[float, StyleLoss]]
    tv_loss: TotalVariationLoss
    weights: torch.Tensor  # (content, style, tv)
    autocast_dtype: torch.dtype | None
    channels_last: bool

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys([*self.content_losses, *self.style_losses]))

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def features(self, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with self.autocast(image.device):
            return self.extractor(image, layers)

    def grams(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The Gram matrices of the style layers, one per image of the batch."""
        return {name: gram_matrix(features[name]) for name in self.style_losses}

    def parts(self, image: torch.Tensor) -> torch.Tensor:
        """Weighted (content, style, tv) as one fp32 tensor, so reading it costs one sync."""
        features = self.features(image, self.layers)
        return self.parts_from(features, self.grams(features), image)

    def parts_from(
        self, features: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], image: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`parts` from ``image``'s features and Grams, computed already."""
        zero = image.new_zeros((), dtype=torch.float32)
        content = sum((loss(features[name]) for name, loss in self.content_losses.items()), zero)
        style = sum(
            (w * loss.of_gram(grams[name]) for name, (w, loss) in self.style_losses.items()), zero
        )
        unweighted = torch.stack([content, style, self.tv_loss(image)])
        return unweighted * self.weights


def build_objective(
    extractor: FeatureExtractor,
    options: dict[str, Any],
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    autocast_dtype: torch.dtype | None,
    channels_last: bool,
) -> Objective:
    objective = Objective(
        extractor=extractor,
        content_losses={},
        style_losses={},
        tv_loss=TotalVariationLoss(),
        weights=torch.tensor(
            [options["content_weight"], options["style_weight"], options["tv_weight"]],
            device=content.device,
        ),
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
    )
    with torch.no_grad():
        content_features = objective.features(content, options["content_layers"])
        objective.content_losses = {
            name: ContentLoss(content_features[name]) for name in options["content_layers"]
        }
        style_grams = [
            {
                name: gram_matrix(feature)
                for name, feature in objective.features(style, options["style_layers"]).items()
            }
            for style in styles
        ]
        objective.style_losses = {
            name: (
                layer_weight,
                StyleLoss(
                    blend_grams([grams[name] for grams in style_grams], options["style_weights"])
                ),
            )
            for name, layer_weight in zip(
                options["style_layers"], options["style_layer_weights"], strict=True
            )
        }
    return objective


def initial_image(
    options: dict[str, Any],
    content: torch.Tensor,
    first_style: Image.Image,
    init_image: Image.Image | None,
) -> torch.Tensor:
    height, width = content.shape[-2:]
    init = options["init"]
    if init == "content":
        return content.clone()
    if init == "noise":
        generator = torch.Generator().manual_seed(options["seed"])
        return torch.rand(content.shape, generator=generator).to(content.device)
    source = first_style if init == "style" else init_image
    assert source is not None
    tensor = to_tensor(source, long_side=max(height, width), device=content.device)
    return resize_to(tensor, height, width)


def finish_image(
    image: torch.Tensor, content: torch.Tensor, options: dict[str, Any]
) -> Image.Image:
    if options["original_colors"]:
        image = keep_original_colors(image, content)
    return to_pil(image)


def optimize(
    runs: list[PreparedRun], on_result: ResultCallback | None = None
) -> list[Result | Exception]:
    """Run ``runs`` (one, or several sharing a batch key) and return their results.

    Every iteration evaluates all the runs still going in one pass through the backbone
    (their images stacked into one batch), then steps each run's own optimizer with its
    own loss and gradient: the losses of different images share no term, so each image's
    gradient is the one it would get alone. In a batch, a run whose callback raises leaves
    it with that exception as its outcome; the others go on. A lone run's exception is
    raised. ``on_result(index, outcome)`` hears of each run as soon as it ends.
    """
    first = runs[0]
    options = first.options
    torch_device = resolve_device(first.device)
    precision = resolve_precision(options["precision"], torch_device)
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    channels_last = autocast_dtype is not None
    layer_order = BACKBONES[options["backbone"]].layer_names
    deepest = max((*options["content_layers"], *options["style_layers"]), key=layer_order.index)
    extractor = load_extractor(
        options["backbone"], device=torch_device, precision=precision, pooling=options["pooling"]
    ).truncated(deepest)

    total = options["iterations"]
    plan = pyramid(options["size"], options["scales"], total)
    resume_from = first.resume_from if len(runs) == 1 else None
    done = resume_from.iteration if resume_from is not None else 0
    states = [_RunState(run, index) for index, run in enumerate(runs)]
    scale_end = 0

    for scale, (long_side, count) in enumerate(plan):
        scale_end += count
        if done >= scale_end:
            continue  # finished before the checkpoint we resume from
        going = [state for state in states if not state.stopped]
        if not going:
            break
        for state in going:
            state.start_scale(
                scale, long_side, extractor, torch_device, autocast_dtype, channels_last,
                resume_from,
            )  # fmt: skip
        evaluation = _Evaluation(going, torch_device)
        while done < scale_end and going:
            parts = evaluation()
            done += 1
            # The iteration's one host sync, for every run in the batch.
            values = torch.stack(parts).tolist()
            for state, run_parts, (content, style, tv) in zip(going, parts, values, strict=True):
                state.step(lambda run_parts=run_parts: run_parts)  # evaluated above
                try:
                    state.report(done, total, scale, len(plan), content, style, tv)
                except Exception as error:
                    if len(runs) == 1:
                        raise
                    state.error, state.stopped = error, True
            going = [state for state in going if not state.stopped]
            if len(going) != len(evaluation.going):  # a batch of the others from now on
                evaluation = _Evaluation(going, torch_device)
            for state in states:  # those that just left the batch
                if state.stopped and not state.announced:
                    state.announce(on_result, total, torch_device, precision)
        for state in states:
            if state.param is not None:
                state.image = state.param.detach()

    for state in states:
        if not state.announced:
            state.announce(on_result, total, torch_device, precision)
    return [state.outcome for state in states]


#: Whether, on CUDA, evaluations and L-BFGS's recursion replay captured graphs
#: (``bench/gpu.py`` turns it off to compare).
cuda_graphs = True
#: Eager evaluations of a set of runs, on the stream the capture will use, before their
#: evaluation is captured: the first pass sets up cuDNN's and cuBLAS's state for that
#: stream, which must not happen during a capture.
GRAPH_WARMUP = 2


class _Evaluation:
    """:func:`_evaluate` for one set of runs at one scale. On CUDA, after ``GRAPH_WARMUP``
    eager passes, the pass (forward, Grams, losses, backward, and for fp16 the loss scaling
    and the gradients' unscaling) is captured once as a CUDA graph and each later
    evaluation is one replay: run eagerly, a step of one image at small and medium sizes
    spends most of its time on the CPU launching some 350 short kernels, not in them
    (``bench/gpu.py``). The images (each run's ``param``, changed in place by its
    optimizer) are the graph's input; the loss parts and each ``param.grad`` (created
    during the capture, unscaled) are its outputs, rewritten by each replay.
    """

    def __init__(self, going: list[_RunState], device: torch.device) -> None:
        self.going = going
        self.graphed = cuda_graphs and device.type == "cuda"
        self.passes = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.parts: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream(device) if self.graphed else None

    def __call__(self) -> list[torch.Tensor]:
        if self.graph is not None:
            self.graph.replay()
            return self.parts
        if self.stream is None:
            return _evaluate(self.going)
        # Autograd's tape, warm-up and capture on one side stream, as CUDA graphs want.
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.passes < GRAPH_WARMUP:
                self.passes += 1
                parts = _evaluate(self.going)
            else:
                self.graph = torch.cuda.CUDAGraph()
                for state in self.going:
                    state.param.grad = None  # so that the capture makes the grads its own
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self.parts = _evaluate(self.going)
                parts = self.parts
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.graph is not None:
            self.graph.replay()  # the capture recorded the pass without running it
        return parts


def _evaluate(going: list[_RunState]) -> list[torch.Tensor]:
    """Each run's weighted (content, style, tv) at its current image, from one pass through
    the backbone; leaves each image's gradient in its ``grad``."""
    objectives, params = [], []
    for state in going:
        assert state.objective is not None and state.param is not None
        state.param.grad = None
        objectives.append(state.objective)
        params.append(state.param)
    # The layers and the extractor are the same for every run of a batch (its batch key).
    features = objectives[0].features(
        params[0] if len(params) == 1 else torch.cat(params), objectives[0].layers
    )
    grams = objectives[0].grams(features)
    if len(params) == 1:  # no slices: a slice's gradient is a copy of the whole feature map
        parts = [objectives[0].parts_from(features, grams, params[0])]
    else:
        # split, not one slice per run: its gradient is put together in one copy.
        per_run_features = {name: feature.split(1) for name, feature in features.items()}
        per_run_grams = {name: gram.split(1) for name, gram in grams.items()}
        parts = [
            objective.parts_from(
                {name: feature[index] for name, feature in per_run_features.items()},
                {name: gram[index] for name, gram in per_run_grams.items()},
                param,
            )
            for index, (objective, param) in enumerate(zip(objectives, params, strict=True))
        ]
    # Scaled for fp16 (its gradients would underflow), unscaled before any optimizer reads
    # them; the parts returned (the losses reported) are never scaled.
    scale = loss_scale(objectives[0].autocast_dtype)
    scaled_backward(torch.stack(parts).sum(), params, scale)
    return [run_parts.detach() for run_parts in parts]


class _RunState:
    """One run's image, objective, optimizer and progress within :func:`optimize`."""

    def __init__(self, run: PreparedRun, index: int) -> None:
        self.run = run
        self.index = index  #: its place in ``optimize``'s runs
        self.options = run.options
        self.objective: Objective | None = None
        self.content_tensor: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.param: torch.Tensor | None = None
        self.optimizer: _Step | None = None
        self.last: Iterate | None = None
        self.iterations = run.resume_from.iteration if run.resume_from is not None else 0
        self.stopped = False
        self.error: Exception | None = None  #: what a callback of this run raised
        self.outcome: Result | Exception | None = None
        self.announced = False

    def start_scale(
        self,
        scale: int,
        long_side: int,
        extractor: FeatureExtractor,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        channels_last: bool,
        resume_from: Checkpoint | None,
    ) -> None:
        run, options = self.run, self.options
        self.content_tensor = to_tensor(run.content, long_side=long_side, device=device)
        height, width = self.content_tensor.shape[-2:]
        style_tensors = [
            to_tensor(style, long_side=style_side(style.size, long_side, options), device=device)
            for style in run.styles
        ]
        if options["original_colors"]:
            # Only the luminance is transferred (finish_image): its targets come from the
            # styles with their luminance matched to the photo's.
            style_tensors = [match_luminance(s, self.content_tensor) for s in style_tensors]
        self.objective = build_objective(
            extractor, options, self.content_tensor, style_tensors, autocast_dtype, channels_last
        )
        optimizer_state: dict[str, np.ndarray] = {}
        image = self.image
        if image is not None:
            image = resize_to(image, height, width)
        elif resume_from is not None:
            image = torch.from_numpy(resume_from.image).to(device)
            if resume_from.scale == scale:
                optimizer_state = resume_from.optimizer_state
            else:  # checkpointed at the last iteration of the previous scale
                image = resize_to(image, height, width)
        else:
            image = initial_image(options, self.content_tensor, run.styles[0], run.init_image)
        self.param = image.detach().clone().requires_grad_(True)
        self.optimizer = _Step(self.param, options, optimizer_state)

    def step(self, closure: Callable[[], torch.Tensor]) -> None:
        assert self.optimizer is not None
        self.optimizer(closure)

    def report(
        self, done: int, total: int, scale: int, scales: int, content: float, style: float,
        tv: float,
    ) -> None:  # fmt: skip
        """The iterate to the run's callback, then its checkpoint if one is due."""
        assert self.param is not None and self.content_tensor is not None
        run, options = self.run, self.options
        self.iterations = done
        preview_every, checkpoint_every = options["preview_every"], options["checkpoint_every"]
        want_preview = done == total or (preview_every > 0 and done % preview_every == 0)
        self.last = Iterate(
            iteration=done,
            total=total,
            scale=scale,
            scales=scales,
            loss=content + style + tv,
            content=content,
            style=style,
            tv=tv,
            elapsed=time.perf_counter() - run.started,
            preview=finish_image(self.param, self.content_tensor, options)
            if want_preview
            else None,
        )
        if run.progress is not None and run.progress(self.last):
            self.stopped = done < total
        due = checkpoint_every > 0 and done % checkpoint_every == 0 and done < total
        if run.on_checkpoint is not None and due:
            assert self.optimizer is not None
            run.on_checkpoint(_checkpoint(self.param, done, scale, options, self.optimizer))
        if self.stopped:
            self.image = self.param.detach()

    def announce(
        self,
        on_result: ResultCallback | None,
        total: int,
        device: torch.device,
        precision: str,
    ) -> None:
        """Settle this run's outcome and tell ``on_result``."""
        self.outcome = self.error or self.result(total, device, precision)
        self.announced = True
        if on_result is not None:
            on_result(self.index, self.outcome)

    def result(self, total: int, device: torch.device, precision: str) -> Result:
        if self.image is None or self.content_tensor is None:  # resumed at the very end
            raise OptionError("nothing left to run from this checkpoint", field="resume_from")
        return Result(
            image=finish_image(self.image, self.content_tensor, self.options),
            iterations=self.iterations,
            total=total,
            stopped=self.stopped,
            last=self.last,
            seed=self.options["seed"],
            device=str(device),
            precision=precision,
            elapsed=time.perf_counter() - self.run.started,
        )


class _Step:
    """One optimizer step on ``param``, given a closure that returns the loss parts at
    ``param`` with its gradient in ``param.grad`` (evaluated once, by :func:`_evaluate`)."""

    def __init__(
        self, param: torch.Tensor, options: dict[str, Any], state: dict[str, np.ndarray]
    ) -> None:
        self.param = param
        self.kind = options["optimizer"]
        if self.kind == "lbfgs":
            self.lbfgs = LBFGS(
                param, lr=1.0, bounds=(0.0, 1.0), max_step=LBFGS_MAX_STEP, graphs=cuda_graphs,
                history_size=lbfgs_history_for(
                    param.shape[-1] * param.shape[-2], options["lbfgs_history"]
                ),
            )  # fmt: skip
        else:
            self.adam = torch.optim.Adam([param], lr=options["lr"])
            if state:
                # Adam keeps its step count on the CPU unless it runs "capturable".
                self.adam.state[param] = {
                    key: torch.from_numpy(value).to("cpu" if key == "step" else param.device)
                    for key, value in state.items()
                }

    def __call__(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.kind == "lbfgs":
            return self.lbfgs.step(closure)
        parts = closure()
        self.adam.step()
        with torch.no_grad():
            self.param.clamp_(0.0, 1.0)
        return parts

    def state(self) -> dict[str, np.ndarray]:
        if self.kind == "lbfgs":
            return {}
        return {
            key: value.detach().cpu().numpy()
            for key, value in self.adam.state.get(self.param, {}).items()
        }


def _checkpoint(
    param: torch.Tensor, done: int, scale: int, options: dict[str, Any], step: _Step
) -> Checkpoint:
    return Checkpoint(
        iteration=done,
        scale=scale,
        image=param.detach().float().cpu().numpy().copy(),
        options=options,
        seed=options["seed"],
        optimizer_state=step.state(),
    )
