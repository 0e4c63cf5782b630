"""Every answer of the API checked against its OpenAPI document, as the tests run.

:class:`ResponseChecker` hooks into a test app (tests/service.py ``service_app``): for each
response of a path the document describes, the status must be one it lists and a JSON body
must match that status's schema (JSON Schema 2020-12, the document's components). Problems
are collected, and the app's fixture fails on any when it closes.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Response, request
from jsonschema import Draft202012Validator

#: Answers any API path may give: refused for the caller (no token, too many requests),
#: the database away. Documented once here, as docs/api.md does, not on every operation.
ANYWHERE = {"401", "429", "503"}


class ResponseChecker:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.problems: list[str] = []
        self.checked = 0

    def schema_of(self, status: str, operation: dict[str, Any]) -> dict[str, Any] | None:
        documented = operation["responses"].get(status)
        if documented is None and status in ANYWHERE:
            return {"$ref": "#/components/schemas/Error"}
        if documented is None:
            return None
        return documented.get("content", {}).get("application/json", {}).get("schema", {})

    def __call__(self, response: Response) -> Response:
        rule = request.url_rule
        if rule is None:
            return response
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        operation = self.document["paths"].get(path, {}).get(request.method.lower())
        if operation is None:
            if path.startswith("/api/") and path not in (
                "/api/docs",
                "/api/docs/assets/{filename}",
            ):
                self.problems.append(f"{request.method} {path}: not in the document")
            return response
        status = str(response.status_code)
        schema = self.schema_of(status, operation)
        where = f"{request.method} {path} {status}"
        if schema is None:
            self.problems.append(f"{where}: status not in the document")
        elif schema and response.is_json:
            validator = Draft202012Validator({**schema, "components": self.document["components"]})
            body = response.get_json()
            for error in validator.iter_errors(body):
                location = "/".join(map(str, error.absolute_path))
                self.problems.append(f"{where}: {location}: {error.message[:300]}")
            self.checked += 1
        return response
