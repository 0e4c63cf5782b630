"""The style-transfer engine: Gatys et al.'s optimization as a pure-torch library.

No Celery, Flask, database or storage here (import-linter checks it). The public surface is
:func:`stylize` with its :class:`Iterate`, :class:`Result` and :class:`Checkpoint` (and,
for batches, :func:`prepare` and :func:`stylize_together`); its options are defined in
:mod:`shared.options`. Importing this package does not import torch
(a run does), so option checks and defaults are cheap to reach.
"""

from worker.engine.checkpoint import Checkpoint
from worker.engine.stylize import prepare, stylize, stylize_together
from worker.engine.types import Iterate, PreparedRun, Result, Temporal, batch_key

__all__ = [
    "Checkpoint",
    "Iterate",
    "PreparedRun",
    "Result",
    "Temporal",
    "batch_key",
    "prepare",
    "stylize",
    "stylize_together",
]
