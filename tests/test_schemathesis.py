"""Schemathesis against the API's own OpenAPI document: no request it generates may get a
5xx. A real server (werkzeug), Redis and worker; bounded in examples and time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service import live_service


def test_no_generated_request_gets_a_server_error(tmp_path: Path) -> None:
    with live_service(tmp_path) as url:
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/api/openapi.json",
             "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "1"],
            capture_output=True, text=True, timeout=400, cwd=tmp_path,  # its cache goes there
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.split("SUMMARY")[-1]
