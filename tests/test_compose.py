"""The production compose file is valid (checked with Debian's docker-compose; no engine)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_passes() -> None:
    def config(**env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("STYLEQUEUE_")}
        return subprocess.run(
            ["docker-compose", "config"], cwd=REPO, capture_output=True, text=True, timeout=60,
            env=clean | env,
        )  # fmt: skip

    secrets = {"STYLEQUEUE_SECRET_KEY": "0123456789abcdef", "MINIO_ROOT_PASSWORD": "m" * 16,
               "FLOWER_BASIC_AUTH": "ops:pw"}  # fmt: skip
    for missing in secrets:  # production refuses to start without each of its secrets
        refused = config(**{k: v for k, v in secrets.items() if k != missing})
        assert refused.returncode != 0 and missing in refused.stderr
    done = config(**secrets)
    assert done.returncode == 0, done.stderr
    assert 'STYLEQUEUE_REQUIRE_TOKEN: "true"' in done.stdout
    assert "STYLEQUEUE_STORAGE_URL: s3://stylequeue/jobs" in done.stdout
    for service in ("web:", "worker:", "preview:", "migrate:", "redis:", "postgres:", "minio:",
                    "bucket:", "flower:"):  # fmt: skip
        assert f"  {service}" in done.stdout
    assert "appendonly" in done.stdout and "nvidia" in done.stdout
