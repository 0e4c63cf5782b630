"""The web tier: the Flask app from ``create_app(test_config)`` on a database and a
redis-server of the module's own, no worker. ``make test-web`` runs these alone, in
seconds; ``make test`` runs them with the rest."""

from __future__ import annotations

import pytest

from shared.config import Settings
from tests.service import service_settings


@pytest.fixture(scope="module")
def settings(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    # Nobody consumes this queue: submitted jobs stay queued, which is all these tests need.
    return service_settings(tmp_path_factory.mktemp("web"), redis_url, database_url=database_url)
