"""What a run needs to continue elsewhere: the current image, where it was, and how.

Stored as an ``.npz`` archive (NumPy, no pickle), so a checkpoint can be written to any
file-like object (a file, a ``BytesIO``, an object-store upload) and read back safely.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from shared.errors import StylequeueError

FORMAT_VERSION = 1


class CheckpointError(StylequeueError):
    code = "invalid_checkpoint"


@dataclass(frozen=True)
class Checkpoint:
    #: Iterations completed over the whole run (all scales).
    iteration: int
    #: Index of the pyramid scale ``image`` belongs to.
    scale: int
    #: The image being optimized, (1, 3, H, W) float32, not clamped.
    image: np.ndarray
    #: The options and input digests of the run (see ``stylize``), checked on resume.
    options: dict[str, Any]
    seed: int
    #: The optimizer's state at this scale (Adam's moments); empty for L-BFGS.
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, file: IO[bytes]) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "iteration": self.iteration,
            "scale": self.scale,
            "options": self.options,
            "seed": self.seed,
        }
        arrays = {"image": self.image, **{f"opt.{k}": v for k, v in self.optimizer_state.items()}}
        np.savez(file, meta=np.array(json.dumps(meta)), **arrays)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, file: IO[bytes] | bytes) -> Checkpoint:
        if isinstance(file, bytes):
            file = io.BytesIO(file)
        try:
            with np.load(file, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                image = archive["image"]
                state = {k[4:]: archive[k] for k in archive.files if k.startswith("opt.")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"not a stylequeue checkpoint: {exc}") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"unsupported checkpoint format {meta.get('format')!r}")
        return cls(
            iteration=int(meta["iteration"]),
            scale=int(meta["scale"]),
            image=image,
            options=meta["options"],
            seed=int(meta["seed"]),
            optimizer_state=state,
        )
