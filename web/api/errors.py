"""Errors as the API answers them: one JSON shape, ``{"error": {code, message, field}}``,
with the status and headers each kind of refusal needs."""

from __future__ import annotations

from flask import (
    Response,
    current_app,
    jsonify,
    request,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.errors import RetryLater, StylequeueError, Unauthorized
from web.api import bp
from web.extensions import services

DATABASE_RETRY_AFTER_SECONDS = 5


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "field": field}})
    response.status_code = status
    return response


@bp.app_errorhandler(StylequeueError)
def _user_error(error: StylequeueError) -> Response:
    return error_response(error.http_status, error.code, error.message, error.field)


@bp.app_errorhandler(DBAPIError)
def _database_down(error: DBAPIError) -> Response:
    """The database is unreachable: ask the client to come back, never a 500."""
    if not error.connection_invalidated and not isinstance(
        error, OperationalError | InterfaceError
    ):
        raise error
    current_app.logger.warning("database unavailable: %s", error.orig)
    services.session.rollback()
    response = error_response(503, "database_unavailable", "the database is unreachable; retry")
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


@bp.app_errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response | HTTPException:
    if not request.path.startswith("/api/"):
        return error
    code = {413: "request_too_large"}.get(error.code or 500, (error.name or "error").lower())
    return error_response(error.code or 500, code.replace(" ", "_"), error.description or "")


@bp.app_errorhandler(RetryLater)
def _retry_later(error: RetryLater) -> Response:
    response = error_response(error.http_status, error.code, error.message)
    response.headers["Retry-After"] = str(error.retry_after)
    return response


@bp.app_errorhandler(Unauthorized)
def _unauthorized(error: Unauthorized) -> Response:
    response = error_response(401, error.code, error.message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="stylequeue"'
    return response
