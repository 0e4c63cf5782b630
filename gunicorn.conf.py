"""gunicorn's settings for the web front end in production (the Dockerfile runs plain
``gunicorn``, which reads ``./gunicorn.conf.py``; bench/api.py measures with it).

Flags given on the command line or in ``GUNICORN_CMD_ARGS`` win, e.g.
``GUNICORN_CMD_ARGS="--bind 127.0.0.1:9000 --workers 4"``.
"""

from __future__ import annotations

import gc
import math
import os
from multiprocessing.sharedctypes import RawArray
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.http.message import Request
    from gunicorn.workers.base import Worker

wsgi_app = "web:create_app()"
bind = ["0.0.0.0:8000"]
# An open event stream (/api/jobs/<id>/events: each job page holds one) lasts as long as
# its job. Under gevent it is a greenlet waiting on its job's live feed (web/feeds.py): a
# few kilobytes, not a thread, so a process holds thousands (bench/streams.py measures
# what they cost the polls). psycopg 3 and redis-py cooperate with gevent's patched
# sockets. GUNICORN_CMD_ARGS="--worker-class gthread" serves with threads instead: then
# each stream holds one, and STYLEQUEUE_EVENT_STREAMS (8) must stay below `threads`.
worker_class = "gevent"
worker_connections = 10_000
#: The streams a gevent process serves at once, unless STYLEQUEUE_EVENT_STREAMS says.
GEVENT_EVENT_STREAMS = 5_000
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = 16  # gthread's
# Event streams last as long as their jobs; a worker timeout would cut them.
timeout = 0
# Each worker process listens on a socket of its own (SO_REUSEPORT), and the kernel spreads
# new connections across them. On one shared socket, whichever process wakes first takes
# them, and all of a client's connections can land on one process while the other idles
# (bench/api.py).
reuse_port = True
# The kernel's hash spreads connections unevenly, though, and the busier process's clients
# wait: the polls' p99 grows fast with the imbalance (bench/api.py). So a process holding
# more than its share of the connections (one over the mean) answers with
# "Connection: close"; the client connects again, and the kernel places the new
# connection afresh. Each process's count lives in memory the processes share.
#: Open connections of each worker process (gthread's ``nr_conns``), by slot.
connections_by_slot: Any = None
MAX_WORKERS = 64


def on_starting(server: Arbiter) -> None:
    """Before the workers fork: the shared counts they inherit."""
    global connections_by_slot
    connections_by_slot = RawArray("i", MAX_WORKERS)


def pre_fork(server: Arbiter, worker: Worker) -> None:
    """In the master: a free slot for the new worker's count (at 0: see child_exit)."""
    taken = {getattr(other, "slot", None) for other in server.WORKERS.values()}
    worker.slot = next((i for i in range(MAX_WORKERS) if i not in taken), None)  # type: ignore[attr-defined]


def child_exit(server: Arbiter, worker: Worker) -> None:
    """In the master: a worker gone holds no connections, and its slot is free again."""
    slot = getattr(worker, "slot", None)
    if slot is not None:
        connections_by_slot[slot] = 0


def post_fork(server: Arbiter, worker: Worker) -> None:
    """In the new worker, before it loads the app: under gevent, streams cost no thread."""
    if "gevent" in worker.cfg.worker_class_str:
        os.environ.setdefault("STYLEQUEUE_EVENT_STREAMS", str(GEVENT_EVENT_STREAMS))


def pre_request(worker: Worker, req: Request) -> None:
    """Close this connection after the answer when this process holds more than its share
    (and freeze the objects the first requests left, see post_worker_init)."""
    if worker.nr in FREEZE_AFTER_REQUESTS:
        gc.freeze()  # what the first requests built lazily (see post_worker_init)
    slot, held = getattr(worker, "slot", None), getattr(worker, "nr_conns", None)
    if slot is None or held is None or connections_by_slot is None:  # not gthread
        return
    connections_by_slot[slot] = held
    share = math.ceil(sum(connections_by_slot[:MAX_WORKERS]) / worker.cfg.workers)
    if held > share + 1:
        req.force_close()


#: Requests after which a worker moves every object it holds out of the collector's sight.
FREEZE_AFTER_REQUESTS = (100, 1_000, 10_000)


def post_worker_init(worker: Worker) -> None:
    """Out of the garbage collector's sight: the app and everything it loaded.

    A full collection scans every object the process holds and stops all its threads
    meanwhile; with all the app's objects in sight, those pauses are long and frequent
    enough to set the polls' p99 (bench/api.py). Frozen objects are not scanned: after
    this and the freezes after the first requests (``FREEZE_AFTER_REQUESTS``, for what they
    build lazily: caches, pooled connections), a full collection scans only what requests
    leave behind. What is frozen is never collected, so the few objects of requests in
    flight at those moments stay: a bounded leak, three times over.
    """
    gc.freeze()


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
