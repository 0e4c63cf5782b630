"""Who is asking: an API token, the web form's session, or nobody; and what they may see.

- ``Authorization: Bearer <token>``: a token made with ``stylequeue token create``. A token
  sent but unknown or revoked is refused (``401``), whatever the settings.
- The web form's session: the pages give each browser a signed session cookie holding a
  random session id (its "session-bound token") and a CSRF token. In open mode the session
  is a principal of its own. With tokens required it acts only for a token its browser
  signed in with (the form asks for one, ``/sign-in``), until that token is revoked;
  ``open_form_sessions`` opts back in to sessions for whoever loads the form. Requests that
  authenticate by that cookie must echo the CSRF token in ``X-CSRF-Token`` on every POST:
  another site can make a browser send the cookie, but cannot read the token.
- Nobody: allowed when ``require_token`` is off (the default for one machine), where a
  job is visible to whoever knows its id (ids are random UUIDs), but listed only to its
  owner (a token, or the browser session that submitted it) and canceled only by its
  owner. With tokens required, only the public endpoints answer, and each job is visible
  to its owner and to admins.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from flask import Flask, g, request, session
from sqlalchemy import Row, Select

from shared.config import address_in, parse_address, parse_networks
from shared.errors import Forbidden, TooManyFailures, Unauthorized
from shared.models import ApiToken, Job
from shared.tokens import find_token
from web.extensions import services

CSRF_HEADER = "X-CSRF-Token"
#: API paths anyone may call, even with tokens required.
PUBLIC_PATHS = {"/api/openapi.json", "/api/docs", "/api/presets"}
#: The API page's script and styles (Swagger UI's files).
PUBLIC_PREFIX = "/api/docs/"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True)
class Principal:
    #: ``token:<id>``, ``session:<id>`` or None (anonymous).
    owner: str | None
    admin: bool = False
    #: The rate-limit bucket: the token, else the client's address.
    bucket: str = ""

    @property
    def scope(self) -> str:
        """Whose Idempotency-Keys and reusable results these are: the owner's, else (an
        anonymous caller in open mode) the client address's, so that two anonymous
        clients share neither."""
        return self.owner or f"client:{self.bucket}"


def secret_key(app: Flask) -> str:
    """The configured key, or a random one kept in ``data_dir/secret_key`` so that the
    processes of one machine (and restarts) agree."""
    configured: str = app.config["SETTINGS"].secret_key
    if configured:
        return configured
    path = Path(app.config["SETTINGS"].data_dir) / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole under a temporary name, then linked into place: a process starting
        # at the same moment sees no file or the whole key, never an empty one.
        draft = path.with_name(f".secret_key.{os.getpid()}.{secrets.token_hex(4)}")
        # Created owner-only: a write then chmod would leave the key readable in between.
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(48))
        try:
            os.link(draft, path)
        except FileExistsError:  # another process was first: use its key
            pass
        except OSError:  # a file system without hard links: last writer wins, whole
            os.replace(draft, path)
        draft.unlink(missing_ok=True)
    return path.read_text().strip()


def start_browser_session() -> str:
    """Give this browser a session id and a CSRF token (once); returns the CSRF token."""
    session.setdefault("sid", secrets.token_urlsafe(18))
    session.setdefault("csrf", secrets.token_urlsafe(32))
    session.permanent = True
    return str(session["csrf"])


def current_principal() -> Principal:
    if "principal" not in g:
        g.principal = _authenticate()
    return g.principal  # type: ignore[no-any-return]


def client_address() -> str:
    """The client's rate-limit address: IPv4 as is, IPv6 by its /64 (one host, or one
    customer of a provider, holds a whole /64 and could rotate through it)."""
    address = request.remote_addr or "unknown"
    ip = parse_address(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


#: Wrong tokens one address may send a minute; past them, each wrong token it sends gets
#: 429 instead of 401 for the rest of that minute. A valid token is always served: the
#: throttle answers the guessing, not a holder who shares the address (a NAT, an IPv6 /64,
#: every client behind a proxy with ``PROXY_HOPS=0``). A token holds 256 random bits, so
#: guessing one is hopeless at any rate; the limit keeps the noise visible and cheap.
FAILED_AUTH_PER_MINUTE = 10


def _count_failed_auth(address: str) -> None:
    """Count a wrong token from ``address`` (in Redis, shared by the web processes; not
    counted when Redis is away) and refuse it with 429 past FAILED_AUTH_PER_MINUTE."""
    key = f"stylequeue:authfail:{address}:{int(time.time() // 60)}"
    try:
        pipe = services.redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
    except redis.RedisError:
        return
    if count > FAILED_AUTH_PER_MINUTE:
        raise TooManyFailures(
            f"{FAILED_AUTH_PER_MINUTE} wrong tokens this minute from your address; "
            "retry in a minute"
        )


def _authenticate() -> Principal:
    address = client_address()
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    # Another scheme (a reverse proxy's Basic sign-in, say) is not ours to judge.
    if scheme.lower() == "bearer":
        if not secret.strip():
            raise Unauthorized("send the token as 'Authorization: Bearer <token>'")
        token = find_token(services.session, secret.strip())
        if token is None:
            _count_failed_auth(address)
            raise Unauthorized("unknown or revoked token")
        principal = Principal(owner=token.owner, admin=token.admin, bucket=token.owner)
        # End the lookup's transaction, so that its connection goes back to the pool: the
        # status poll reads on a connection of its own, and one thread holding two would
        # need a pool twice the server's threads.
        services.session.rollback()
        return principal
    if "sid" in session and services.settings.form_sessions:
        if request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not csrf_matches(sent):
                raise Forbidden(f"missing or wrong {CSRF_HEADER}; reload the form")
        if not session_needs_token():
            return Principal(owner=f"session:{session['sid']}", bucket=address)
        token = signed_in_token()
        if token is not None:
            return Principal(owner=token.owner, admin=token.admin, bucket=token.owner)
    return Principal(owner=None, bucket=address)


def csrf_matches(sent: str) -> bool:
    """Whether ``sent`` is this browser session's CSRF token."""
    expected = str(session.get("csrf", "")).encode()
    return bool(expected) and hmac.compare_digest(sent.encode("utf-8", "replace"), expected)


def session_needs_token() -> bool:
    """Whether a browser session acts only for a token it signed in with."""
    settings = services.settings
    return settings.require_token and not settings.open_form_sessions


def signed_in_token() -> ApiToken | None:
    """The live token this browser session signed in with, if any."""
    token_id = session.get("token")
    if not token_id:
        return None
    try:
        token = services.session.get(ApiToken, uuid.UUID(str(token_id)))
    except ValueError:
        return None
    # The lookup's transaction ends here, as a bearer token's does.
    services.session.rollback()
    if token is None or token.revoked_at is not None:
        return None
    return token


def sign_in(secret: str) -> None:
    """Let this browser session act for the token ``secret`` (a wrong one is counted as a
    wrong bearer token is)."""
    token = find_token(services.session, secret.strip())
    if token is None:
        _count_failed_auth(client_address())
        raise Unauthorized("unknown or revoked token")
    session["token"] = str(token.id)
    services.session.rollback()


def sign_out() -> None:
    session.pop("token", None)


def may_see_internals() -> bool:
    """Whether the caller may see how the service runs (``/metrics``, the detail of
    ``/readyz``): an admin token, or a client inside ``metrics_networks`` (Settings)."""
    if current_principal().admin:
        return True
    return address_in(request.remote_addr, parse_networks(services.settings.metrics_networks))


def require_access() -> None:
    """Before every API request: authenticate, and refuse anonymous calls when tokens are
    required (except the public endpoints)."""
    principal = current_principal()
    if (
        principal.owner is None
        and services.settings.require_token
        and request.path not in PUBLIC_PATHS
        and not request.path.startswith(PUBLIC_PREFIX)
    ):
        raise Unauthorized("this server requires an API token ('Authorization: Bearer ...')")


def may_see(job: Job | Row[Any]) -> bool:
    """``job`` is an ORM job or a row of ``jobs``."""
    principal = current_principal()
    return not services.settings.require_token or principal.admin or job.owner == principal.owner


def may_change(job: Job) -> bool:
    """Whether the caller may cancel ``job``: its owner or an admin. In open mode a job
    submitted anonymously (no owner) may be canceled by whoever knows its id."""
    principal = current_principal()
    if principal.admin or job.owner == principal.owner:
        return True
    return not services.settings.require_token and job.owner is None


def listed(query: Select[tuple[Job]]) -> Select[tuple[Job]]:
    """``query`` narrowed to the jobs the caller may list: its own (a token's, or a browser
    session's), all of them for an admin. Nobody lists anonymously, in open mode too:
    knowing an id is what lets one see a job there, so the list must not hand ids out."""
    principal = current_principal()
    if principal.owner is None:
        raise Unauthorized(
            "listing jobs needs an API token ('Authorization: Bearer ...') or the web "
            "form's session"
        )
    if principal.admin:
        return query
    return query.where(Job.owner == principal.owner)
