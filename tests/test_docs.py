"""The docs cannot drift from the code: the settings table is the code's, every variable the
code reads is documented, the README stays short and its links lead somewhere."""

from __future__ import annotations

import re
import subprocess

from shared.config import settings_reference
from shared.fields import options_reference
from tests.conftest import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"


def test_the_settings_table_is_generated_from_the_code() -> None:
    text = CONFIGURATION.read_text()
    table = text.split("<!-- settings: begin -->\n", 1)[1].split("\n<!-- settings: end -->", 1)[0]
    assert table.splitlines() == settings_reference(), (
        "docs/configuration.md is stale: run python -m shared.config docs/configuration.md"
    )
    # Every setting says what it does.
    assert all(not row.endswith("|  |") for row in settings_reference())


def test_the_options_table_is_generated_from_the_schema() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    table = text.split("<!-- options: begin -->\n", 1)[1].split("\n<!-- options: end -->", 1)[0]
    assert table.splitlines() == options_reference(), (
        "docs/api.md is stale: run python -m shared.fields docs/api.md"
    )
    assert len(options_reference()) > 20
    assert all(not row.endswith("|  |") for row in table.splitlines())  # each says what it does


def test_every_variable_the_code_reads_is_documented() -> None:
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.yml", "Makefile", "Dockerfile", ".ci/*"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    documented = CONFIGURATION.read_text()
    read = {
        name.rstrip("_")
        for path in files
        for name in re.findall(r"STYLEQUEUE_[A-Z0-9_]+", (REPO / path).read_text())
    }
    assert read, "the search found nothing: the check would pass vacuously"
    missing = sorted(name for name in read if name not in documented)
    assert missing == []


def test_the_readme_is_short_and_its_links_lead_somewhere() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert links, "no links found: the check would pass vacuously"
    for link in links:
        assert (REPO / link).exists(), link
    for command in ("make run", "make test"):
        assert command in readme
