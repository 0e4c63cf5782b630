"""``stylequeue``: run the engine locally, run the service, submit jobs, manage weights.

The option flags of ``stylequeue run`` and ``stylequeue submit`` are generated from the
option schema (:class:`shared.options.Submission`): same names (``--style-weight`` for
``style_weight``), types, choices, defaults and help. A user error ends with one
``stylequeue: error: ...`` line and exit status 1 (2 for bad flags), never a traceback.
The engine and the worker are imported only by the commands that run them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.backbones import BACKBONES
from shared.config import Settings
from shared.errors import StylequeueError
from shared.fields import choices, field_kind, form_text
from shared.options import OPTION_NAMES, Submission
from stylequeue.local import command_run

PROG = "stylequeue"
#: The schema's fields that are flags of ``run`` and of ``submit``: the options, the styles'
#: blend and the mode.
OPTION_FLAGS = (*OPTION_NAMES, "style_weights", "mode")


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_option_flags(
    parser: argparse.ArgumentParser, names: Sequence[str], suppress: bool = False
) -> None:
    """One flag per schema field in ``names``; with ``suppress``, a flag not given is left
    out of the namespace, so the server applies its own defaults."""
    for name in names:
        info = Submission.model_fields[name]
        kind, default = field_kind(name), info.default
        help_text = (info.description or "").replace("%", "%%")
        unit = (info.json_schema_extra or {}).get("x-unit")  # type: ignore[union-attr]
        if default not in (None, ()) and kind != "bool":
            help_text += f" (default: {form_text(default)}{' ' + str(unit) if unit else ''})"
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "init":  # a choice, or the path of an image to start from
            kwargs["metavar"] = "{" + ",".join(choices(name)) + "} or IMAGE"
        elif kind == "choice":
            kwargs["choices"] = list(choices(name))
        elif kind in ("int", "float"):
            kwargs["type"] = int if kind == "int" else float
        elif kind == "names":
            kwargs.update(type=_str_list, metavar="NAME,NAME")
        elif kind == "numbers":
            kwargs.update(type=_float_list, metavar="W,W")
        if suppress:
            kwargs["default"] = argparse.SUPPRESS
        parser.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)


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
    _add_option_flags(run, OPTION_FLAGS)
    run.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device"
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save a checkpoint every N iterations (default: 0, never)",
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
    fetch = weights_commands.add_parser(
        "fetch", help="download a backbone's weights (vgg16-caffe: convert the installed ones)"
    )
    fetch.add_argument("name", choices=[n for n, s in BACKBONES.items() if s.needs_weights])
    weights.set_defaults(handler=command_weights)
    return parser


def _add_service_commands(commands: Any) -> None:
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
    submit.add_argument(
        "--server", default=os.environ.get("STYLEQUEUE_SERVER", "http://127.0.0.1:5000")
    )
    submit.add_argument(
        "--token",
        default=os.environ.get("STYLEQUEUE_TOKEN"),
        help="API token, when the server requires one (default: $STYLEQUEUE_TOKEN)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the job and save the result")
    submit.add_argument(
        "-o", "--output", type=Path, help="where --wait saves the result (PNG, or a video's MP4)"
    )
    _add_option_flags(submit, OPTION_FLAGS, suppress=True)
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
    from stylequeue.submit import submit_and_wait

    options: dict[str, str] = {}
    for name in OPTION_FLAGS:
        if hasattr(args, name):
            value = getattr(args, name)
            options[name] = form_text(value)
    if args.preset:
        options["style_preset"] = ",".join(args.preset)
    if not args.styles and not args.preset:
        raise StylequeueError("give a STYLE image or --preset NAME", field="style")
    return submit_and_wait(
        args.server, args.content, args.styles, options, args.output, args.wait, args.token
    )


def command_weights(args: argparse.Namespace) -> int:
    from worker.engine.weights import (
        WeightsLocations,
        convert_packaged,
        fetch_weights,
        packaged_file,
    )

    locations = WeightsLocations.from_env()
    if args.weights_command == "fetch":
        spec = BACKBONES[args.name]
        source = packaged_file(spec)
        if source is not None and locations.find(spec) == source:
            # Installed with the worker: converted here, no download.
            path = convert_packaged(spec, source, locations)
            print(f"{args.name}: converted {source.name} into {path}")
            return 0
        path = fetch_weights(spec, locations)
        print(f"{args.name}: saved {path}")
        return 0
    for name, spec in BACKBONES.items():
        if not spec.needs_weights:
            print(f"{name:14} available  built in (seeded filters, no file)  {spec.description}")
            continue
        found = locations.find(spec)
        where = found or locations.candidates(spec)[0]
        if found is not None and found == packaged_file(spec):
            where = f"{found} (converted on first use)"
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
