"""``stylequeue``: run the engine locally and manage backbone weights.

The flags of ``stylequeue run`` are generated from :func:`worker.engine.stylize`'s
signature: same names (``--style-weight`` for ``style_weight``), same defaults, help taken
from its docstring. A user error ends with one ``stylequeue: error: ...`` line and exit
status 1 (2 for bad flags), never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.errors import StylequeueError
from shared.images import decode_image
from worker.allocator import keep_freed_memory
from worker.engine import BACKBONES, Checkpoint, Iterate, stylize
from worker.engine.stylize import INIT_CHOICES

#: ``--mode fast`` and ``--init fast``: the feed-forward network instead of, or before, the
#: optimization.
FAST = "fast"

PROG = "stylequeue"
# Parameters of ``stylize`` that are not flags: the inputs and the callbacks.
NOT_FLAGS = {"content", "styles", "progress", "on_checkpoint", "resume_from", "preview_every"}


def _docstring_args(function: Callable[..., Any]) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring, one help text per parameter."""
    doc = inspect.getdoc(function) or ""
    section = doc.split("Args:", 1)[-1].split("\n\n", 1)[0] if "Args:" in doc else ""
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in section.splitlines():
        match = re.match(r"^    ([a-z_, ]+): (.*)$", line)
        if match:
            current = [name.strip() for name in match.group(1).split(",")]
            for name in current:
                helps[name] = match.group(2)
        elif line.startswith("        ") and current:
            for name in current:
                helps[name] += " " + line.strip()
    # Sphinx markup reads badly in a terminal: ``x`` and :mod:`x` become x.
    plain = {name: re.sub(r":\w+:`([^`]+)`|``([^`]+)``", r"\1\2", t) for name, t in helps.items()}
    return {name: text.replace("%", "%%") for name, text in plain.items()}


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_engine_flags(
    parser: argparse.ArgumentParser, only: Sequence[str] | None = None, suppress: bool = False
) -> None:
    """One flag per ``stylize`` parameter (those in ``only``); with ``suppress``, a flag not
    given is left out of the namespace, so the server applies its own defaults."""
    hints = typing.get_type_hints(stylize)
    helps = _docstring_args(stylize)
    for name, param in inspect.signature(stylize).parameters.items():
        if name in NOT_FLAGS or (only is not None and name not in only):
            continue
        flag = "--" + name.replace("_", "-")
        hint = hints[name]
        default = param.default
        help_text = helps.get(name, "").rstrip(".")
        if isinstance(default, tuple):
            help_text += f" (default: {','.join(default)})"
        elif default is not None and not isinstance(default, bool):
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        args = typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = help_text
        elif name == "init":
            kwargs["metavar"] = "{" + ",".join((*INIT_CHOICES, FAST)) + "} or IMAGE"
            kwargs["help"] = f"{help_text}; {FAST}: the feed-forward picture (--mode fast's)"
        elif name == "backbone":
            kwargs["choices"] = list(BACKBONES)
        elif typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        elif hint in (int, int | None):
            kwargs["type"] = int
        elif hint in (float, float | None):
            kwargs["type"] = float
        elif str in args or hint == Sequence[str]:
            kwargs["type"] = _str_list
            kwargs["metavar"] = "NAME,NAME"
        elif float in args or hint in (Sequence[float], Sequence[float] | None):
            kwargs["type"] = _float_list
            kwargs["metavar"] = "W,W"
        if suppress:
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument(flag, dest=name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Neural style transfer.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="stylize an image on this machine",
        description="Render CONTENT in the style of one or more STYLE images.",
    )
    run.add_argument("content", metavar="CONTENT", help="the photo (JPEG, PNG or WebP)")
    run.add_argument("styles", metavar="STYLE", nargs="+", help="one or more style images")
    run.add_argument("-o", "--output", required=True, type=Path, help="where to write the PNG")
    _add_engine_flags(run)
    run.add_argument(
        "--mode",
        choices=("optimize", FAST),
        default="optimize",
        help="optimize: Gatys et al.'s optimization; fast: only the feed-forward picture "
        "(Ghiasi et al. 2017), in about a second (default: optimize)",
    )
    run.add_argument(
        "--log-every", type=int, default=0, metavar="N", help="print the loss every N iterations"
    )
    run.add_argument(
        "--checkpoint", type=Path, metavar="FILE", help="with --checkpoint-every: where to save"
    )
    run.add_argument("--resume", type=Path, metavar="FILE", help="continue from a checkpoint")
    run.add_argument(
        "--progress-bar",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar on stderr",
    )
    run.set_defaults(handler=command_run)

    _add_service_commands(commands)

    weights = commands.add_parser("weights", help="list the backbones and their weights")
    weights_commands = weights.add_subparsers(dest="weights_command", metavar="ACTION")
    fetch = weights_commands.add_parser("fetch", help="download a backbone's weights")
    fetch.add_argument("name", choices=[n for n, s in BACKBONES.items() if s.needs_weights])
    weights.set_defaults(handler=command_weights)
    return parser


def _add_service_commands(commands: Any) -> None:
    from shared.jobs import JOB_OPTIONS

    default_host = os.environ.get("HOST", "127.0.0.1")
    default_port = int(os.environ.get("PORT", "5000"))
    for name, help_text in (
        ("web", "run the web front end and API"),
        ("serve", "run everything on this machine: Redis if needed, a worker, the web"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--host", default=default_host, help="(default: $HOST or 127.0.0.1)")
        command.add_argument(
            "--port", type=int, default=default_port, help="(default: $PORT or 5000)"
        )
        command.set_defaults(handler=command_web if name == "web" else command_serve)

    worker = commands.add_parser("worker", help="run a worker (one per GPU)")
    worker.add_argument("--name", help="the worker's name (default: host:pid)")
    worker.add_argument(
        "--gpus",
        metavar="all|0,1,...",
        help="one worker process per GPU, each seeing only its own (default: one worker on "
        "STYLEQUEUE_DEVICE)",
    )
    worker.set_defaults(handler=command_worker)
    preview = commands.add_parser(
        "preview-worker",
        help="run a preview worker: the feed-forward network on a CPU (instant previews, "
        "mode=fast jobs)",
    )
    preview.add_argument("--name", help="the worker's name (default: host:pid)")
    preview.set_defaults(handler=command_preview_worker)

    db = commands.add_parser("db", help="manage the job database")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="migrate to the latest schema")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_commands.add_parser("downgrade", help="migrate back to a revision")
    downgrade.add_argument("revision")
    db.set_defaults(handler=command_db)

    token = commands.add_parser(
        "token", help="manage API tokens", description="Manage API tokens (shown once)."
    )
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="make a token and print its secret")
    create.add_argument("name", help="who or what the token is for")
    create.add_argument("--admin", action="store_true", help="sees and cancels every job")
    token_commands.add_parser("list", help="list the tokens (never their secrets)")
    revoke = token_commands.add_parser("revoke", help="revoke a token at once")
    revoke.add_argument("name")
    token.set_defaults(handler=command_token)

    submit = commands.add_parser(
        "submit", help="submit a job to a server", description="Submit a job to a server."
    )
    submit.add_argument("content", metavar="CONTENT", type=Path)
    submit.add_argument("styles", metavar="STYLE", nargs="*", type=Path)
    submit.add_argument("--preset", action="append", default=[], help="a style preset's name")
    submit.add_argument("--style-weights", metavar="W,W", help="blend weights of the styles")
    submit.add_argument(
        "--server", default=os.environ.get("STYLEQUEUE_SERVER", "http://127.0.0.1:5000")
    )
    submit.add_argument(
        "--token",
        default=os.environ.get("STYLEQUEUE_TOKEN"),
        help="API token, when the server requires one (default: $STYLEQUEUE_TOKEN)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the job and save the result")
    submit.add_argument("-o", "--output", type=Path, help="where --wait saves the PNG")
    submit.add_argument(
        "--mode",
        choices=("optimize", "fast"),
        default="optimize",
        help="fast: the feed-forward picture only, made in about a second",
    )
    _add_engine_flags(submit, only=JOB_OPTIONS, suppress=True)
    submit.set_defaults(handler=command_submit)


def command_web(args: argparse.Namespace) -> int:
    from stylequeue.service import run_web

    run_web(args.host, args.port)
    return 0


def command_serve(args: argparse.Namespace) -> int:
    from stylequeue.service import serve

    return serve(args.host, args.port)


def command_worker(args: argparse.Namespace) -> int:
    from stylequeue.service import fetch_default_weights, run_gpu_workers, run_worker

    settings = Settings.from_env()
    if not fetch_default_weights(settings):
        # Its GPU workers (children) need not try again.
        os.environ["STYLEQUEUE_OFFLINE"] = "true"
    if args.gpus:
        return run_gpu_workers(args.gpus, args.name)
    run_worker(Settings.from_env(), args.name)
    return 0


def command_preview_worker(args: argparse.Namespace) -> int:
    from stylequeue.service import run_preview_worker

    run_preview_worker(Settings.from_env(), args.name)
    return 0


def command_db(args: argparse.Namespace) -> int:
    from shared.migrate import downgrade, upgrade

    url = Settings.from_env().database_url
    if args.db_command == "upgrade":
        upgrade(url, args.revision)
    else:
        downgrade(url, args.revision)
    print(f"database {url}: at {args.revision}")
    return 0


def command_token(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from shared.db import make_engine, make_sessionmaker
    from shared.models import ApiToken
    from shared.tokens import create_token, revoke_token

    engine = make_engine(Settings.from_env().database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            if args.token_command == "create":
                token, secret = create_token(session, args.name, admin=args.admin)
                kind = "admin token" if token.admin else "token"
                print(
                    f"{kind} {token.name!r} created; its secret, shown only now:", file=sys.stderr
                )
                print(secret)
            elif args.token_command == "revoke":
                token = revoke_token(session, args.name)
                print(f"token {token.name!r} revoked")
            else:
                for token in session.scalars(select(ApiToken).order_by(ApiToken.created_at)):
                    state = f"revoked {token.revoked_at:%Y-%m-%d}" if token.revoked_at else "live"
                    role = "admin" if token.admin else "user"
                    print(f"{token.name}\t{role}\t{state}\tcreated {token.created_at:%Y-%m-%d}")
    finally:
        engine.dispose()
    return 0


def command_submit(args: argparse.Namespace) -> int:
    from shared.jobs import JOB_OPTIONS
    from stylequeue.submit import submit_and_wait

    options: dict[str, str] = {}
    for name in JOB_OPTIONS:
        if hasattr(args, name):
            value = getattr(args, name)
            options[name] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if args.style_weights:
        options["style_weights"] = args.style_weights
    options["mode"] = args.mode
    if args.preset:
        options["style_preset"] = ",".join(args.preset)
    if not args.styles and not args.preset:
        raise StylequeueError("give a STYLE image or --preset NAME", field="style")
    return submit_and_wait(
        args.server, args.content, args.styles, options, args.output, args.wait, args.token
    )


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

    def __call__(self, iterate: Iterate) -> None:
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

    keep_freed_memory()  # as a worker does (worker/allocator.py)
    content = decode_image(args.content, name="content", **limits)
    styles = [decode_image(path, name="style", **limits) for path in args.styles]
    if args.mode == FAST:
        return _run_fast(args, content, styles)
    init: Any = args.init
    if init == FAST:
        # The optimization starts from the feed-forward picture (resized to each run's
        # first scale by the engine).
        init = _feedforward(args, content, styles)
    elif init not in INIT_CHOICES:
        init = decode_image(init, name="init", **limits)
    resume_from = None
    if args.resume:
        if not args.resume.is_file():
            raise StylequeueError(f"no such file: {args.resume}", field="--resume")
        with args.resume.open("rb") as file:
            resume_from = Checkpoint.load(file)

    def save_checkpoint(checkpoint: Checkpoint) -> None:
        _atomic_write(args.checkpoint, checkpoint.save)

    options = {
        name: getattr(args, name)
        for name in inspect.signature(stylize).parameters
        if name not in NOT_FLAGS
    }
    options["init"] = init
    reporter = Reporter(args.log_every, args.progress_bar)
    started = time.perf_counter()
    try:
        result = stylize(
            content=content,
            styles=styles,
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


def command_weights(args: argparse.Namespace) -> int:
    from worker.engine.weights import WeightsLocations, fetch_weights

    locations = WeightsLocations.from_env()
    if args.weights_command == "fetch":
        path = fetch_weights(BACKBONES[args.name], locations)
        print(f"{args.name}: saved {path}")
        return 0
    for name, spec in BACKBONES.items():
        if not spec.needs_weights:
            print(f"{name:14} available  built in (seeded filters, no file)  {spec.description}")
            continue
        found = locations.find(spec)
        where = found or locations.candidates(spec)[0]
        state = "available" if found else "missing  "
        print(f"{name:14} {state}  {where}  {spec.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except StylequeueError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
