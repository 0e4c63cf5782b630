"""Uploads that cannot hold a web process: a stalled one is dropped, a slow one is cut off,
each client has a few at once, and the parts wait on disk rather than in memory.

Under gunicorn's gevent workers (``timeout = 0``, thousands of connections a process) a
client could otherwise open many uploads, send part of each and stop, holding the bytes
sent so far for as long as it liked. Here:

- a read that waits ``upload_idle_seconds`` for the client ends the upload (``408``), and
  so does a body still arriving after ``upload_seconds``;
- one client has at most ``uploads_per_client`` uploads in flight in a process (``429``
  beyond);
- a file part past ``upload_memory_bytes`` goes to a temporary file (web/limits.py);
- at most ``submissions_at_once`` complete bodies are read into memory and checked at
  once; the others wait with their parts on disk.

The idle limit needs the connection's socket, which gunicorn (``gunicorn.socket``) and
Werkzeug's server (``werkzeug.socket``) give; the whole-upload limit needs nothing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from flask import request

from shared.errors import RateLimited, StylequeueError
from web.auth import current_principal
from web.extensions import services


class UploadTimeout(StylequeueError):
    code = "upload_timeout"
    http_status = 408


class _GuardedInput:
    """``wsgi.input`` whose reads raise UploadTimeout once the upload is over its time or
    idle limit. Not an OSError: Werkzeug would take that for a client that left (400)."""

    def __init__(self, inner: Any, idle: float) -> None:
        self.inner, self.idle = inner, idle
        #: Set (from a timer) when the whole upload's time is up.
        self.expired = threading.Event()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            if not self.expired.is_set():
                data = getattr(self.inner, method)(*args)
                if not self.expired.is_set():
                    return data
        except TimeoutError:  # socket.timeout: the idle limit
            raise UploadTimeout(
                f"the upload stopped sending for {self.idle:g} s; send it again"
            ) from None
        except Exception:
            if not self.expired.is_set():
                raise
        raise UploadTimeout("the upload took too long; send it again over a faster connection")

    def read(self, *args: Any) -> bytes:
        return self._call("read", *args)  # type: ignore[no-any-return]

    def readline(self, *args: Any) -> bytes:
        return self._call("readline", *args)  # type: ignore[no-any-return]


def _connection() -> socket.socket | None:
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    return sock if isinstance(sock, socket.socket) else None


@contextmanager
def guarded_upload() -> Iterator[None]:
    """Around reading a request's body: the client's place, the limits above. Call before
    anything reads ``request.form`` or ``request.files``."""
    settings = services.settings
    client = current_principal().bucket  # whose limits apply, as web/api/access.py's
    places = services.client_uploads
    if not places.acquire(client):
        raise RateLimited(
            f"you are sending {places.limit} uploads to this server already; wait for one "
            "to finish",
            retry_after=5,
        )
    sock = _connection()
    previous = sock.gettimeout() if sock is not None else None
    guarded = _GuardedInput(request.environ["wsgi.input"], settings.upload_idle_seconds)
    request.environ["wsgi.input"] = guarded

    def stop_reading() -> None:
        # Nothing more is read from this client: a read blocked on a trickle (one waiting
        # for a whole chunk) returns, and the server, which would read the rest of the body
        # before the next request, finds its end and closes.
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def expire() -> None:
        guarded.expired.set()
        stop_reading()

    timer = threading.Timer(settings.upload_seconds, expire)
    timer.daemon = True
    try:
        if sock is not None and settings.upload_idle_seconds > 0:
            sock.settimeout(settings.upload_idle_seconds)
        timer.start()
        yield
    except UploadTimeout:
        stop_reading()
        raise
    finally:
        timer.cancel()
        if sock is not None:
            with suppress(OSError):
                sock.settimeout(previous)
        places.release(client)
