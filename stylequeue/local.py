"""``stylequeue run``: the engine on this machine, from image files to a PNG, with a
progress bar, loss lines, checkpoints and resume. The engine (and torch) is imported only
when a run starts."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import StylequeueError
from shared.images import decode_image
from shared.options import INIT_CHOICES, INIT_FAST, OPTION_NAMES


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            write(file)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_writable(path: Path, flag: str) -> None:
    if not path.parent.is_dir():
        raise StylequeueError(f"directory {path.parent} does not exist", field=flag)
    if not os.access(path.parent, os.W_OK):
        raise StylequeueError(f"cannot write into {path.parent}", field=flag)


class Reporter:
    """The progress bar and the ``iter=N, loss=...`` lines."""

    def __init__(self, log_every: int, show_bar: bool) -> None:
        self.log_every = log_every
        self.show_bar = show_bar
        self.bar: Any = None

    def __call__(self, iterate: Any) -> None:  # a worker.engine.Iterate
        if self.bar is None:
            # Made at the first iterate, so errors before the run starts stand alone.
            from tqdm import tqdm

            self.bar = tqdm(
                total=iterate.total,
                initial=iterate.iteration - 1,  # a resumed run starts where it was
                unit="it",
                disable=not self.show_bar,
                file=sys.stderr,
                leave=False,
            )
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{iterate.loss:.4g}", scale=f"{iterate.scale + 1}/{iterate.scales}"
        )
        if self.log_every and iterate.iteration % self.log_every == 0:
            self.bar.write(
                f"iter={iterate.iteration}, loss={iterate.loss:.6g} (content={iterate.content:.4g}"
                f", style={iterate.style:.4g}, tv={iterate.tv:.4g})",
                file=sys.stdout,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def command_run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    if args.log_every < 0:
        raise StylequeueError("must be 0 or more", field="--log-every")
    _check_writable(args.output, "--output")
    if args.checkpoint_every and not args.checkpoint:
        args.checkpoint = args.output.with_suffix(".ckpt")
    if args.checkpoint:
        _check_writable(args.checkpoint, "--checkpoint")

    from worker.allocator import keep_freed_memory
    from worker.engine import Checkpoint, stylize

    keep_freed_memory()  # as a worker does (worker/allocator.py)
    content = decode_image(args.content, name="content", **limits)
    styles = [decode_image(path, name="style", **limits) for path in args.styles]
    if args.mode == "fast":
        return _run_fast(args, content, styles)
    init: Any = args.init
    if init == INIT_FAST:
        # The optimization starts from the feed-forward picture (resized to each run's
        # first scale by the engine).
        init = _feedforward(args, content, styles)
    elif init not in INIT_CHOICES:  # the path of an image to start from
        init = decode_image(init, name="init", **limits)
    resume_from = None
    if args.resume:
        if not args.resume.is_file():
            raise StylequeueError(f"no such file: {args.resume}", field="--resume")
        with args.resume.open("rb") as file:
            resume_from = Checkpoint.load(file)

    def save_checkpoint(checkpoint: Any) -> None:  # a worker.engine.Checkpoint
        _atomic_write(args.checkpoint, checkpoint.save)

    options = {name: getattr(args, name) for name in OPTION_NAMES}
    options["init"] = init
    reporter = Reporter(args.log_every, args.progress_bar)
    started = time.perf_counter()
    try:
        result = stylize(
            content=content,
            styles=styles,
            style_weights=args.style_weights,
            device=args.device,
            checkpoint_every=args.checkpoint_every,
            progress=reporter,
            on_checkpoint=save_checkpoint if args.checkpoint else None,
            resume_from=resume_from,
            **options,
        )
    finally:
        reporter.close()
    _atomic_write(args.output, lambda file: result.image.save(file, format="PNG"))
    duration = time.perf_counter() - started
    ran = result.iterations - (resume_from.iteration if resume_from else 0)
    final = f", loss={result.last.loss:.6g}" if result.last else ""
    print(
        f"done: {result.iterations}/{result.total} iterations{final} in {duration:.1f} s "
        f"({ran / duration:.2f} it/s, {result.device}, {result.precision}, seed {result.seed})"
        f" -> {args.output}"
    )
    return 0


def _feedforward(args: argparse.Namespace, content: Any, styles: list[Any]) -> Any:
    from worker.feedforward import MAX_SIZE, MIN_SIZE, stylize_fast

    # The network runs at 384 px whatever is asked; its picture is resized within its bounds.
    size = min(max(args.size, MIN_SIZE), MAX_SIZE)
    return stylize_fast(content, styles, args.style_weights, size=size)


def _run_fast(args: argparse.Namespace, content: Any, styles: list[Any]) -> int:
    started = time.perf_counter()
    image = _feedforward(args, content, styles)
    _atomic_write(args.output, lambda file: image.save(file, format="PNG"))
    duration = time.perf_counter() - started
    print(f"done: feed-forward picture in {duration:.2f} s -> {args.output}")
    return 0
