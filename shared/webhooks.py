"""Webhooks: a job's optional ``callback_url`` receives one signed ``job.finished`` POST.

Each delivery carries ``X-Stylequeue-Timestamp`` (Unix seconds) and
``X-Stylequeue-Signature: sha256=<hex>``, the HMAC-SHA256 under the server's webhook secret
of ``<timestamp>.<body>``: a receiver recomputes it (:func:`verify`) and refuses old
timestamps, so a captured delivery cannot be replayed later. Only hosts on the
configured allow-list are called, redirects are not followed (they could leave it), and a
delivery that fails is retried with exponential backoff (worker/webhooks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from shared.config import Settings
from shared.errors import OptionError

SIGNATURE_HEADER = "X-Stylequeue-Signature"
TIMESTAMP_HEADER = "X-Stylequeue-Timestamp"
EVENT_HEADER = "X-Stylequeue-Event"
DELIVERY_TIMEOUT_SECONDS = 10.0
MAX_URL_LENGTH = 2000


def allowed_hosts(settings: Settings) -> set[str]:
    return {host.strip().lower() for host in settings.webhook_hosts.split(",") if host.strip()}


def check_callback_url(url: str, settings: Settings) -> str:
    """``url`` if callbacks are on and it points at an allowed host; else a clear error."""
    hosts = allowed_hosts(settings)
    if not hosts or not settings.webhook_secret:
        raise OptionError("this server does not send callbacks", field="callback_url")
    if len(url) > MAX_URL_LENGTH or not url.isprintable():
        raise OptionError(
            f"must be a printable URL of at most {MAX_URL_LENGTH} characters", field="callback_url"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OptionError("not a URL", field="callback_url") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise OptionError("must be an http:// or https:// URL", field="callback_url")
    if parts.username is not None or parts.password is not None:
        raise OptionError("must not carry a user name or password", field="callback_url")
    host = parts.hostname.lower()
    if host not in hosts and (port is None or f"{host}:{port}" not in hosts):
        raise OptionError(
            f"host {host!r} is not on this server's callback allow-list", field="callback_url"
        )
    return url


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, headers: Any, body: bytes, *, tolerance_seconds: float = 300.0) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance_seconds
    except ValueError:
        return False
    return fresh and hmac.compare_digest(given, signature(secret, timestamp, body))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is a failed delivery, not a trip off the allow-list


_opener = urllib.request.build_opener(_NoRedirects)


def post(url: str, payload: dict[str, Any], secret: str) -> None:
    """POST ``payload`` signed; raises ``OSError`` (incl. HTTP errors) unless a 2xx came."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "stylequeue-webhook/1",
            EVENT_HEADER: payload.get("event", ""),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(secret, timestamp, body),
        },
    )
    try:
        with _opener.open(request, timeout=DELIVERY_TIMEOUT_SECONDS) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        raise OSError(f"HTTP {error.code}") from None
    except http.client.HTTPException as error:
        raise OSError(f"bad HTTP response: {error!r}") from None
    if not 200 <= status < 300:
        raise OSError(f"HTTP {status}")
