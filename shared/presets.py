"""The style presets shipped with the project (paintings, resized, with attribution)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    file: str
    title: str
    artist: str
    year: int
    rights: str
    source: str

    @property
    def path(self) -> Path:
        return PRESETS_DIR / self.file

    @property
    def attribution(self) -> str:
        return f"{self.artist}, {self.title} ({self.year}), {self.rights}"


@cache
def presets() -> dict[str, Preset]:
    entries = json.loads((PRESETS_DIR / "presets.json").read_text())
    return {entry["name"]: Preset(**entry) for entry in entries}
