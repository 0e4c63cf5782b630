"""The OpenAPI 3.1 description of the API, with the job options read from the engine."""

from __future__ import annotations

from typing import Any

from shared.jobs import JOB_OPTIONS, MODE_CHOICES
from worker.engine.stylize import defaults

ERROR = {"$ref": "#/components/schemas/Error"}
MODE = {
    "type": "string",
    "enum": list(MODE_CHOICES),
    "description": "optimize (default): Gatys et al.'s optimization; fast: the feed-forward "
    "picture only, in about a second",
}
JOB = {"$ref": "#/components/schemas/Job"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(ERROR, "error") for code in codes}


JOB_FIELDS = (
    "id", "status", "params", "created_at", "started_at", "finished_at", "progress",
    "eta_seconds", "loss", "queue_position", "error", "attempts", "resumed_from_iteration",
    "worker", "device", "links", "reused_from", "expired_at", "cancel_requested", "callback",
    "styles", "mode", "wait_seconds", "scales", "preview", "queue", "runs",
)  # fmt: skip
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


#: The link a new job's answer gives to each operation on it.
JOB_LINKS = {
    "GetJob": "getJob", "GetLosses": "getLosses", "GetResult": "getResult",
    "GetPreview": "getPreview", "CancelJob": "cancelJob",
}  # fmt: skip


def openapi_document() -> dict[str, Any]:
    option_defaults = defaults()
    options = {
        name: {
            "type": "string",
            "description": f"engine option `{name}` (default: {option_defaults[name]!r})",
        }
        for name in JOB_OPTIONS
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "stylequeue", "version": "1"},
        "paths": {
            "/api/jobs": {
                "post": {
                    "summary": "Submit a style-transfer job",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["content"],
                                    "properties": {
                                        "content": {"type": "string", "format": "binary"},
                                        "style": {
                                            "type": "array",
                                            "items": {"type": "string", "format": "binary"},
                                        },
                                        "style_preset": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                        },
                                        "reuse": {
                                            "type": "string",
                                            "description": "false: never reuse a result",
                                        },
                                        "style_weights": {
                                            "type": "string",
                                            "description": "comma-separated, normalized",
                                        },
                                        "callback_url": {
                                            "type": "string",
                                            "description": "receives a signed POST when the "
                                            "job finishes (allow-listed hosts only)",
                                        },
                                        "mode": MODE,
                                        **options,
                                    },
                                }
                            }
                        },
                    },
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "maxLength": 150},
                            "description": "the same key and request give the same job",
                        }
                    ],
                    "responses": {
                        "200": _json(JOB, "replayed: the job this Idempotency-Key created"),
                        "201": _json(JOB, "a finished job's result reused (fixed seed)"),
                        "202": {
                            **_json(JOB, "queued; Location names the job"),
                            # For clients and stateful testing: the calls a new job enables.
                            "links": {
                                name: {
                                    "operationId": operation,
                                    "parameters": {"job_id": "$response.body#/id"},
                                }
                                for name, operation in JOB_LINKS.items()
                            },
                        },
                        **_errors(400, 409, 413, 415, 422, 429, 503),
                    },
                },
                "get": {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": t}}
                        for n, t in (
                            ("status", "string"),
                            ("limit", "integer"),
                            ("cursor", "string"),
                        )
                    ],
                    "description": "the caller's own jobs (an admin's: all); needs a token "
                    "or the form's session",
                    "responses": {
                        "200": _json({"type": "object"}, "a page of jobs"),
                        **_errors(401, 422),
                    },
                },
            },
            "/api/jobs/{job_id}": {
                "get": {
                    "summary": "A job's status, progress, latest loss and links",
                    "operationId": "getJob",
                    "parameters": [JOB_ID],
                    "responses": {"200": _json(JOB, "the job"), **_errors(404)},
                }
            },
            "/api/jobs/{job_id}/losses": {
                "get": {
                    "summary": "Loss points in iteration order",
                    "operationId": "getLosses",
                    "parameters": [
                        JOB_ID,
                        {"name": "after", "in": "query", "schema": {"type": "integer"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {"200": _json({"type": "object"}, "points"), **_errors(404)},
                }
            },
            "/api/jobs/{job_id}/events": {
                "get": {
                    "summary": "Server-Sent Events: status, loss, preview, done; resumable "
                    "with Last-Event-ID. 503 streams_busy (with Retry-After) while the "
                    "server's streams are all taken: poll the job and its losses instead",
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_errors(404, 503),
                    },
                }
            },
            "/api/jobs/{job_id}/result": {
                "get": {
                    "summary": "The result PNG",
                    "operationId": "getResult",
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": {"description": "PNG", "content": {"image/png": {}}},
                        **_errors(404, 409),
                    },
                }
            },
            "/api/jobs/{job_id}/preview": {
                "get": {
                    "summary": "The latest preview PNG",
                    "operationId": "getPreview",
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": {"description": "PNG", "content": {"image/png": {}}},
                        **_errors(404),
                    },
                }
            },
            "/api/jobs/{job_id}/again": {
                "post": {
                    "summary": "A new job on this job's images and options, with the options "
                    "given here changed (e.g. style_strength); answered as a submission",
                    "parameters": [JOB_ID],
                    "requestBody": {
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"mode": MODE, **options},
                                }
                            },
                            "application/x-www-form-urlencoded": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"mode": MODE, **options},
                                }
                            },
                        },
                    },
                    "responses": {
                        "201": _json(JOB, "the same result reused (nothing changed)"),
                        "202": _json(JOB, "queued; Location names the new job"),
                        **_errors(400, 404, 410, 422, 429, 503),
                    },
                }
            },
            "/api/jobs/{job_id}/content": {
                "get": {
                    "summary": "The job's content photo, as uploaded",
                    "parameters": [JOB_ID],
                    "responses": {"200": {"description": "the image"}, **_errors(404, 410)},
                }
            },
            "/api/jobs/{job_id}/styles/{position}": {
                "get": {
                    "summary": "One of the job's style images, as uploaded",
                    "parameters": [
                        JOB_ID,
                        {
                            "name": "position",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {"200": {"description": "the image"}, **_errors(404, 410)},
                }
            },
            "/api/estimate": {
                "get": {
                    "summary": "How long a job of these options would take now, on the live "
                    "workers' measured speed, with the queue's wait",
                    "parameters": [
                        {"name": n, "in": "query", "schema": {"type": "integer"}}
                        for n in ("size", "iterations", "scales", "width", "height")
                    ]
                    + [{"name": "mode", "in": "query", "schema": MODE}],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Estimate"}, "the estimate"),
                        **_errors(422),
                    },
                }
            },
            "/api/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel (idempotent)",
                    "operationId": "cancelJob",
                    "parameters": [JOB_ID],
                    "responses": {
                        "200": _json(JOB, "already finished"),
                        "202": _json(JOB, "canceled or cancel requested"),
                        **_errors(403, 404),
                    },
                }
            },
            "/api/webhook-secret": {
                "get": {
                    "summary": "The secret the caller's callbacks are signed with",
                    "responses": {
                        "200": _json({"type": "object"}, "secret and algorithm"),
                        **_errors(401, 422),
                    },
                }
            },
            "/api/presets": {
                "get": {
                    "summary": "Style presets",
                    "responses": {"200": {"description": "presets"}},
                }
            },
            "/api/workers": {
                "get": {
                    "summary": "Live workers and their backbones",
                    "responses": {"200": {"description": "workers"}},
                }
            },
            "/healthz": {"get": {"summary": "Alive", "responses": {"200": {"description": "ok"}}}},
            "/readyz": {
                "get": {
                    "summary": "Database, Redis and at least one live worker",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
        },
        # With STYLEQUEUE_REQUIRE_TOKEN on, every API path but the OpenAPI document and the
        # presets needs a token (401 without); the web form's session cookie works too.
        "security": [{"bearer": []}, {}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "field": {"type": ["string", "null"]},
                            },
                        }
                    },
                },
                "Job": {
                    "type": "object",
                    "properties": {name: {} for name in JOB_FIELDS},
                },
                "Estimate": {
                    "type": "object",
                    "required": ["run_seconds", "wait_seconds", "total_seconds", "workers"],
                    "properties": {
                        "run_seconds": {"type": ["number", "null"]},
                        "wait_seconds": {"type": ["number", "null"]},
                        "total_seconds": {"type": ["number", "null"]},
                        "workers": {"type": "integer"},
                        "basis": {"type": "string", "enum": ["measured", "none"]},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    }
