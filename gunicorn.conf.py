"""gunicorn's settings for the web front end in production (the Dockerfile runs plain
``gunicorn``, which reads ``./gunicorn.conf.py``; bench/api.py measures with it).

Flags given on the command line or in ``GUNICORN_CMD_ARGS`` win, e.g.
``GUNICORN_CMD_ARGS="--bind 127.0.0.1:9000 --workers 4"``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter

wsgi_app = "web:create_app()"
bind = ["0.0.0.0:8000"]
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# An open event stream (/api/jobs/<id>/events: each job page holds one) keeps its thread
# for as long as it lasts. A process serves at most STYLEQUEUE_EVENT_STREAMS (8) of them and
# refuses more, so that the polls always have the other threads.
threads = 16
# Event streams last as long as their jobs; gthread's worker timeout would cut them.
timeout = 0
# Each worker process listens on a socket of its own (SO_REUSEPORT), and the kernel spreads
# new connections across them. On the one shared socket, whichever process woke first took
# them: in bench/api.py all 50 of wrk's connections sometimes went to one of the two
# processes (one core busy, the other idle: 400-520 polls/s instead of 1,700-1,900).
reuse_port = True


def when_ready(server: Arbiter) -> None:
    """Warn when open event streams could take every thread of a worker process."""
    from shared.config import Settings

    streams = Settings.from_env().event_streams
    if server.cfg.worker_class_str == "gthread" and streams >= server.cfg.threads:
        server.log.warning(
            "STYLEQUEUE_EVENT_STREAMS=%d is not below the %d threads of a worker process: "
            "open job pages can take every thread, and the API stops answering",
            streams,
            server.cfg.threads,
        )
