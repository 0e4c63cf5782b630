"""Settings read from ``STYLEQUEUE_*`` environment variables, with embedded defaults.

Every process (command line, web, worker) builds its settings the same way, so one set of
variables configures the whole service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from shared.errors import OptionError

PREFIX = "STYLEQUEUE_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    #: Largest accepted image file, in bytes.
    max_image_bytes: int = 20 * 1024 * 1024
    #: Largest accepted image, in pixels (width × height), checked before decoding.
    max_image_pixels: int = 40_000_000
    #: Largest output long side, in pixels.
    max_size: int = 2048
    #: Where files live (uploads, results, previews, checkpoints).
    data_dir: Path = Path("var")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``STYLEQUEUE_<FIELD>`` variables; ``overrides`` win over both."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = environ.get(PREFIX + field.name.upper())
            if raw is None:
                continue
            kind = type(field.default)
            try:
                values[field.name] = kind(raw)
            except ValueError as exc:
                raise OptionError(
                    f"cannot read {raw!r} as {kind.__name__}", field=PREFIX + field.name.upper()
                ) from exc
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
