"""Errors a user can cause, each with a stable machine-readable code.

The command line prints ``str(error)`` as a one-line message; the API turns
``code``, ``field`` and ``http_status`` into its ``{"error": {...}}`` body.
"""

from __future__ import annotations


class StylequeueError(Exception):
    """Base of every error caused by input or configuration, never by a bug."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    @property
    def public(self) -> str:
        """What a job's submitter is told: the message, unless it names what only the
        operators should see (then they find it in the worker's log)."""
        return str(self)


class OptionError(StylequeueError):
    """An option out of range, of the wrong type or not among the choices."""

    code = "invalid_option"
    http_status = 422


class ImageError(StylequeueError):
    """An image that cannot be used: unreadable, unsupported or too large."""

    code = "invalid_image"
    http_status = 422


class UnsupportedImageFormat(ImageError):
    code = "unsupported_image_format"
    http_status = 415


class ImageTooLarge(ImageError):
    code = "image_too_large"
    http_status = 413


class WeightsError(StylequeueError):
    """A backbone's weights are missing, corrupt or cannot be fetched."""

    code = "weights_unavailable"
    http_status = 503

    @property
    def public(self) -> str:
        # The message names the server's files and directories: for the log only.
        what = "the model weights" if self.field is None else f"the {self.field}'s weights"
        return f"{what} cannot be loaded on the worker; the operators' log says why"


# The service's refusals (the API answers each with its status; web/api/errors.py).


class Unauthorized(StylequeueError):
    code = "unauthorized"
    http_status = 401


class TooManyFailures(StylequeueError):
    code = "rate_limited"
    http_status = 429


class Forbidden(StylequeueError):
    code = "forbidden"
    http_status = 403


class RetryLater(StylequeueError):
    """Refused for now: the answer says when to come back (``Retry-After``, seconds)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryLater):
    code = "rate_limited"
    http_status = 429


class StreamsBusy(RetryLater):
    code = "streams_busy"
    http_status = 503


class NotFound(StylequeueError):
    code = "not_found"
    http_status = 404


class Conflict(StylequeueError):
    code = "not_ready"
    http_status = 409


class Expired(StylequeueError):
    code = "expired"
    http_status = 410


class IdempotencyConflict(StylequeueError):
    code = "idempotency_key_reused"
    http_status = 409
