"""What the service benches share: waiting for a condition, and writing their section of
``docs/benchmarks.md`` between its markers (each bench owns one section)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    every: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """``condition()``'s first truthy value, polled every ``every`` seconds; exceptions in
    ``tolerate`` count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except tolerate:
            value = None
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def update_section(path: Path, name: str, body: list[str]) -> str:
    """Replace (or append) the section ``name`` of ``path``; returns the section's text."""
    begin, end = markers(name)
    section = "\n".join([begin, *body, end])
    text = path.read_text()
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return section
