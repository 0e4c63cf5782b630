"""The JSON API, one module per concern (as microblog's ``app/api``): ``errors``,
``access`` (authentication and rate limits), ``reads`` (loading jobs), ``serialize`` (the
job as JSON), ``submit``, ``jobs`` (a job's resources), ``events`` (its stream), ``health``
and ``docs`` (the OpenAPI document and its page)."""

from flask import Blueprint

bp = Blueprint("api", __name__)

# The modules register their routes and handlers on ``bp``; imported after it exists.
from web.api import access, docs, errors, events, health, jobs, submit  # noqa: E402, F401
from web.api.access import check_rate  # noqa: E402
from web.api.reads import live_workers, load_job, offered_backbones  # noqa: E402
from web.api.serialize import job_json, job_links  # noqa: E402

__all__ = [
    "bp",
    "check_rate",
    "job_json",
    "job_links",
    "live_workers",
    "load_job",
    "offered_backbones",
]
