"""The production compose file is valid (checked with Debian's docker-compose; no engine)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_passes() -> None:
    done = subprocess.run(
        ["docker-compose", "config"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for service in ("web:", "worker:", "migrate:", "redis:", "postgres:"):
        assert f"  {service}" in done.stdout
    assert "appendonly" in done.stdout and "nvidia" in done.stdout
