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
               "MINIO_APP_PASSWORD": "a" * 16, "POSTGRES_PASSWORD": "p" * 16,
               "REDIS_PASSWORD": "r" * 16, "FLOWER_BASIC_AUTH": "ops:pw"}  # fmt: skip
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
    # Redis asks for its password, and every client sends it.
    assert "--requirepass" in done.stdout
    assert done.stdout.count(f"redis://:{'r' * 16}@redis:6379/0") >= 4
    # The apps use their own MinIO user, never the root account.
    assert f"AWS_SECRET_ACCESS_KEY: {'a' * 16}" in done.stdout
    assert f"AWS_SECRET_ACCESS_KEY: {'m' * 16}" not in done.stdout
    # Nothing is published on every interface: the web only for a proxy on this machine.
    published = [line.strip() for line in done.stdout.splitlines() if line.strip()[:2] == "- "
                 and line.strip().endswith("/tcp")]  # fmt: skip
    assert published and all(line.startswith("- 127.0.0.1:") for line in published), published
    assert "- 127.0.0.1:8000:8000/tcp" in published
