"""Webhooks: a job's optional ``callback_url`` receives one signed ``job.finished`` POST.

Each delivery carries ``X-Stylequeue-Timestamp`` (Unix seconds) and
``X-Stylequeue-Signature: sha256=<hex>``, the HMAC-SHA256 of ``<timestamp>.<body>`` under
the job owner's signing secret (:func:`owner_secret`; ``GET /api/webhook-secret``): a
receiver recomputes it (:func:`verify`) and refuses old timestamps, so a captured delivery
cannot be replayed later, and one owner's receiver cannot forge another's deliveries.

Only hosts and ports on the configured allow-list are called (a bare host: ports 80 and
443), only at addresses that are public or inside ``webhook_networks`` (checked after
resolving, and the connection made to the checked address), redirects are not followed
(they could leave the list), and a delivery that fails is retried with exponential
backoff (worker/webhooks.py).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import urllib3

from shared.config import IPNetwork, Settings, address_in, parse_address, parse_networks
from shared.errors import OptionError

SIGNATURE_HEADER = "X-Stylequeue-Signature"
TIMESTAMP_HEADER = "X-Stylequeue-Timestamp"
EVENT_HEADER = "X-Stylequeue-Event"
DELIVERY_TIMEOUT_SECONDS = 10.0
MAX_URL_LENGTH = 2000
DEFAULT_PORTS = {"http": 80, "https": 443}


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
    if host not in hosts and not any(entry.startswith(f"{host}:") for entry in hosts):
        raise OptionError(
            f"host {host!r} is not on this server's callback allow-list", field="callback_url"
        )
    # A bare host allows the web's ports (80, 443); another port must be listed with it.
    effective = port if port is not None else DEFAULT_PORTS[parts.scheme]
    if f"{host}:{effective}" not in hosts and not (
        host in hosts and effective in DEFAULT_PORTS.values()
    ):
        raise OptionError(
            f"port {effective} of {host!r} is not on this server's callback allow-list",
            field="callback_url",
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


class DeliveryFailed(OSError):
    """A delivery that did not get a 2xx. ``public`` is what the submitter is shown (the
    job's ``callback.error``): the HTTP status, or that the receiver could not be reached,
    never the connection's own words (they would tell what answers on a host's ports);
    the details go to the worker's log (``str(error)``)."""

    def __init__(self, public: str, detail: str = "") -> None:
        super().__init__(f"{public}: {detail}" if detail else public)
        self.public = public


def owner_secret(secret: str, owner: str | None) -> str:
    """The signing secret of ``owner``'s deliveries: derived from the server's secret, so
    that no receiver can sign a delivery meant for another owner's. Jobs without an owner
    (submitted anonymously in open mode) share one."""
    label = f"owner:{owner}" if owner else "anonymous"
    return hmac.new(secret.encode(), label.encode(), hashlib.sha256).hexdigest()


#: Neither public nor an address of a host of its own, though ``ipaddress`` calls them
#: global: NAT64's local-use prefix (RFC 8215) and the IPv4 dummy address (RFC 7600).
_NOT_GLOBAL = parse_networks("64:ff9b:1::/48,192.0.0.8/32")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: NAT64's (RFC 6052), 6to4's and an
    IPv4-compatible one's (``::a.b.c.d``). A 6to4 or NAT64 address of a private IPv4 one
    reaches that host through a relay or translator."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = []
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    return found


def _address_allowed(address: str, networks: list[IPNetwork]) -> bool:
    ip = parse_address(address)
    if ip is None:
        return False
    if address_in(address, networks):
        return True
    leads_to = [ip, *_embedded_ipv4(ip)]
    return all(each.is_global and not any(each in net for net in _NOT_GLOBAL) for each in leads_to)


def resolve_checked(host: str, port: int, settings: Settings) -> str:
    """An address of ``host`` that is public (``ipaddress``: not loopback, link-local,
    private, shared or reserved) or inside ``webhook_networks``; DeliveryFailed if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise DeliveryFailed("the receiver's name did not resolve", str(error)) from None
    networks = parse_networks(settings.webhook_networks)
    resolved = [str(info[4][0]) for info in infos]
    for address in resolved:
        if _address_allowed(address, networks):
            return address
    raise DeliveryFailed(
        "the receiver's address is not public",
        f"{host} resolves to {', '.join(resolved)}, outside webhook_networks",
    )


def post(url: str, payload: dict[str, Any], secret: str, settings: Settings) -> None:
    """POST ``payload`` signed with ``secret`` to ``url`` (already checked against the
    allow-list): connected to an address checked by :func:`resolve_checked`, and to that
    address only, so that a name which resolves anew cannot lead elsewhere. Redirects are
    not followed (they could leave the allow-list). Raises :class:`DeliveryFailed` unless
    a 2xx came."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    parts = urlsplit(url)
    host = str(parts.hostname)
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    address = resolve_checked(host, port, settings)
    timeout = urllib3.Timeout(total=DELIVERY_TIMEOUT_SECONDS)
    pool: urllib3.HTTPConnectionPool
    if parts.scheme == "https":
        # TLS to the pinned address, the certificate checked against the name.
        pool = urllib3.HTTPSConnectionPool(
            address, port, server_hostname=host, assert_hostname=host, timeout=timeout
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout)
    headers = {
        "Host": parts.netloc.rpartition("@")[2],
        "Content-Type": "application/json",
        "User-Agent": "stylequeue-webhook/1",
        EVENT_HEADER: payload.get("event", ""),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with pool:
            response = pool.urlopen(
                "POST", target, body=body, headers=headers, redirect=False, retries=False,
                preload_content=False, assert_same_host=False,
            )  # fmt: skip
            status = response.status
            response.release_conn()
    except urllib3.exceptions.HTTPError as error:
        raise DeliveryFailed("the receiver could not be reached", repr(error)) from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"HTTP {status}")
