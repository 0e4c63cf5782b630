"""Schemathesis against the API's own OpenAPI document: no request it generates may get a
5xx, a status the document does not list, or a body unlike the document's schema, in any
phase: examples, coverage, fuzzing, and stateful sequences that follow the
document's links (submit a job, then read, list and cancel it). Anonymously and with a
token. A real server (werkzeug), Redis and worker; bounded in examples and time."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import live_service, make_token, service_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One live service for both callers: its URL and its folder (database)."""
    base = tmp_path_factory.mktemp("schemathesis")
    with live_service(base) as url:
        yield url, base


@pytest.mark.parametrize("who", ["anonymous", "token"])
def test_no_generated_request_gets_a_server_error(
    server: tuple[str, Path], tmp_path: Path, who: str
) -> None:
    url, base = server
    headers = []
    if who == "token":
        secret = make_token(service_settings(base, "redis://unused"), "schemathesis")
        headers = ["-H", f"Authorization: Bearer {secret}"]
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/api/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
         "--max-examples", "20", "--seed", "1",
         "--phases", "examples,coverage,fuzzing,stateful", *headers],
        capture_output=True, text=True, timeout=500, cwd=tmp_path,  # its cache goes there
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    summary = done.stdout.split("SUMMARY")[-1]
    assert " passed" in done.stdout and not re.search(r"\d+ failed", summary)
    assert "Stateful" in done.stdout, done.stdout[-2000:]
