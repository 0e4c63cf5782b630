"""The layers in the order the data flows, as pyproject.toml's import contracts state them:
shared below the web and the worker (which do not import each other), the engine free of
Flask, Celery, the database and storage, torch nowhere on the web side. import-linter reads
every import, those inside functions too."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, python_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_code_keeps_its_import_contracts() -> None:
    done = lint_imports(ROOT, ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert f"{len(contracts['contracts'])} kept, 0 broken" in done.stdout


def test_the_contracts_catch_an_import_against_the_flow(tmp_path: Path) -> None:
    """The same contracts on a tree of the same packages where shared imports the web and
    the engine imports Flask: both are reported."""
    files = {
        "shared/__init__.py": "",
        "shared/jobs.py": "import web.api\n",
        "web/__init__.py": "",
        "web/api.py": "",
        "worker/__init__.py": "",
        "worker/engine/__init__.py": "def run():\n    import flask\n",
        "stylequeue/__init__.py": "",
    }
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for contract in contracts["contracts"]:  # the modules they name must exist
        layers = [name.strip() for layer in contract.get("layers", []) for name in layer.split("|")]
        named = [*contract.get("forbidden_modules", []), *contract.get("source_modules", [])]
        for module in [*named, *layers]:
            path = module.replace(".", "/")
            if module.split(".")[0] in contracts["root_packages"] and (
                f"{path}/__init__.py" not in files
            ):
                files.setdefault(path + ".py", "")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    done = lint_imports(tmp_path, tmp_path)
    assert done.returncode != 0
    assert "shared.jobs -> web.api" in done.stdout
    assert "worker.engine -> flask" in done.stdout
