"""The optimization loop behind :func:`worker.engine.stylize.stylize`: the pyramid, each
run's image and optimizer, and the progress it reports. The device and precision are
chosen in :mod:`worker.engine.device`, the loss is :mod:`worker.engine.objective`'s, and
on CUDA :mod:`worker.engine.graphs` replays it."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from shared.backbones import BACKBONES
from shared.errors import OptionError
from shared.normalize import style_side
from shared.options import RunOptions
from shared.pyramid import lbfgs_history_for, pyramid
from worker.engine.backbones import FeatureExtractor
from worker.engine.checkpoint import Checkpoint
from worker.engine.device import (
    AUTOCAST_DTYPES,
    load_extractor,
    resolve_device,
    resolve_precision,
)
from worker.engine.graphs import Evaluation
from worker.engine.imaging import (
    keep_original_colors,
    match_luminance,
    resize_to,
    to_pil,
    to_tensor,
)
from worker.engine.lbfgs import LBFGS
from worker.engine.losses import TemporalLoss
from worker.engine.objective import Objective, build_objective
from worker.engine.types import Iterate, PreparedRun, Result, ResultCallback, Temporal

#: L-BFGS's trust region: the most a pixel (in [0, 1]) may move in one step. Unbounded, the
#: first steps of a scale (and of a resumed run: its history starts empty) can throw pixels
#: to the box's walls and the loss rises before it falls (far more with Gatys et al.'s raw
#: errors than with the relative ones); 0.25 keeps every scale's start falling and
#: reaches the same final loss (bench/scale_start.py, docs/benchmarks.md "Scale starts").
LBFGS_MAX_STEP: float | None = 0.25


def temporal_loss(
    temporal: Temporal, height: int, width: int, device: torch.device
) -> TemporalLoss:
    """The temporal loss at a scale of ``height`` × ``width``: its target and weights resized."""
    target = resize_to(to_tensor(temporal.target, long_side=max(height, width), device=device),
                       height, width)  # fmt: skip
    weights = torch.as_tensor(temporal.weights, dtype=torch.float32, device=device)[None, None]
    return TemporalLoss(target, resize_to(weights, height, width))


def initial_image(run: PreparedRun, content: torch.Tensor) -> torch.Tensor:
    height, width = content.shape[-2:]
    init = run.options.init
    if init == "content":
        return content.clone()
    if init == "noise":
        generator = torch.Generator().manual_seed(run.seed)
        return torch.rand(content.shape, generator=generator).to(content.device)
    source = run.styles[0] if init == "style" else run.init_image
    assert source is not None
    tensor = to_tensor(source, long_side=max(height, width), device=content.device)
    return resize_to(tensor, height, width)


def finish_image(image: torch.Tensor, content: torch.Tensor, options: RunOptions) -> Image.Image:
    if options.original_colors:
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
    precision = resolve_precision(options.precision, torch_device)
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    channels_last = autocast_dtype is not None
    layer_order = BACKBONES[options.backbone].layer_names
    deepest = max((*options.content_layers, *options.style_layers), key=layer_order.index)
    extractor = load_extractor(
        options.backbone, device=torch_device, precision=precision, pooling=options.pooling
    ).truncated(deepest)

    total = options.iterations
    plan = pyramid(options.size, options.scales, total)
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
        evaluation = _evaluation(going, torch_device, first.cuda_graphs)
        while done < scale_end and going:
            parts = evaluation()
            done += 1
            # The iteration's one host sync, for every run in the batch.
            values = torch.stack(parts).tolist()
            for state, run_parts, losses in zip(going, parts, values, strict=True):
                state.step(lambda run_parts=run_parts: run_parts)  # evaluated above
                try:
                    state.report(done, total, scale, len(plan), *losses)
                except Exception as error:
                    if len(runs) == 1:
                        raise
                    state.error, state.stopped = error, True
            going = [state for state in going if not state.stopped]
            if len(going) != len(evaluation.params):  # a batch of the others from now on
                evaluation = _evaluation(going, torch_device, first.cuda_graphs)
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


def _evaluation(going: list[_RunState], device: torch.device, graphs: bool) -> Evaluation:
    objectives, params = [], []
    for state in going:
        assert state.objective is not None and state.param is not None
        objectives.append(state.objective)
        params.append(state.param)
    return Evaluation(objectives, params, device, graphs=graphs)


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
        if options.original_colors:
            # Only the luminance is transferred (finish_image): its targets come from the
            # styles with their luminance matched to the photo's.
            style_tensors = [match_luminance(s, self.content_tensor) for s in style_tensors]
        self.objective = build_objective(
            extractor, options, run.style_weights, self.content_tensor, style_tensors,
            autocast_dtype, channels_last,
        )  # fmt: skip
        if run.temporal is not None:
            self.objective.temporal_loss = temporal_loss(run.temporal, height, width, device)
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
            image = initial_image(run, self.content_tensor)
        self.param = image.detach().clone().requires_grad_(True)
        self.optimizer = _Step(self.param, options, optimizer_state, graphs=run.cuda_graphs)

    def step(self, closure: Callable[[], torch.Tensor]) -> None:
        assert self.optimizer is not None
        self.optimizer(closure)

    def report(
        self, done: int, total: int, scale: int, scales: int, content: float, style: float,
        tv: float, temporal: float,
    ) -> None:  # fmt: skip
        """The iterate to the run's callback, then its checkpoint if one is due."""
        assert self.param is not None and self.content_tensor is not None
        run, options = self.run, self.options
        self.iterations = done
        preview_every, checkpoint_every = run.preview_every, run.checkpoint_every
        want_preview = done == total or (preview_every > 0 and done % preview_every == 0)
        self.last = Iterate(
            iteration=done,
            total=total,
            scale=scale,
            scales=scales,
            loss=content + style + tv + temporal,
            content=content,
            style=style,
            tv=tv,
            temporal=temporal,
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
            run.on_checkpoint(_checkpoint(self.param, done, scale, run, self.optimizer))
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
            seed=self.run.seed,
            device=str(device),
            precision=precision,
            elapsed=time.perf_counter() - self.run.started,
        )


class _Step:
    """One optimizer step on ``param``, given a closure that returns the loss parts at
    ``param`` with its gradient in ``param.grad`` (evaluated once, by
    :func:`worker.engine.objective.evaluate`)."""

    def __init__(
        self,
        param: torch.Tensor,
        options: RunOptions,
        state: dict[str, np.ndarray],
        *,
        graphs: bool,
    ) -> None:
        self.param = param
        self.kind = options.optimizer
        if self.kind == "lbfgs":
            self.lbfgs = LBFGS(
                param, lr=1.0, bounds=(0.0, 1.0), max_step=LBFGS_MAX_STEP, graphs=graphs,
                history_size=lbfgs_history_for(
                    param.shape[-1] * param.shape[-2], options.lbfgs_history
                ),
            )  # fmt: skip
        else:
            self.adam = torch.optim.Adam([param], lr=options.lr)
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
    param: torch.Tensor, done: int, scale: int, run: PreparedRun, step: _Step
) -> Checkpoint:
    return Checkpoint(
        iteration=done,
        scale=scale,
        image=param.detach().float().cpu().numpy().copy(),
        options=run.checkpoint_options(),
        seed=run.seed,
        optimizer_state=step.state(),
    )
