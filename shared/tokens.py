"""API tokens: created by an operator (``stylequeue token create``), shown once, stored
only as the SHA-256 of their secret."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import OptionError
from shared.models import ApiToken, utcnow

#: Tokens look like ``sq_<43 url-safe characters>``: 256 random bits, recognizable in logs
#: and secret scanners.
TOKEN_PREFIX = "sq_"


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, name: str, *, admin: bool = False) -> tuple[ApiToken, str]:
    """A new token named ``name``; returns it and its secret (not stored anywhere)."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise OptionError("a token's name is 1 to 100 printable characters", field="name")
    if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
        raise OptionError(f"a token named {name!r} exists already", field="name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, secret_sha256=secret_digest(secret), admin=admin)
    session.add(token)
    session.flush()
    return token, secret


def find_token(session: Session, secret: str) -> ApiToken | None:
    """The live token with this secret, if any (looked up by digest: no timing leak)."""
    token = session.scalar(select(ApiToken).where(ApiToken.secret_sha256 == secret_digest(secret)))
    if token is None or token.revoked_at is not None:
        return None
    return token


def revoke_token(session: Session, name: str) -> ApiToken:
    token = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if token is None:
        raise OptionError(f"no token named {name!r}", field="name")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token
