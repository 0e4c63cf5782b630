"""The style-transfer engine: Gatys et al.'s optimization as a pure-torch library.

No Celery, Flask, database or storage here (import-linter checks it). The public surface is
:func:`stylize` with its :class:`Iterate`, :class:`Result` and :class:`Checkpoint`; its
options are defined in :mod:`shared.options`. Importing this package does not import torch
(a run does), so option checks and defaults are cheap to reach.
"""

from worker.engine.checkpoint import Checkpoint
from worker.engine.stylize import Iterate, Result, stylize

__all__ = ["Checkpoint", "Iterate", "Result", "stylize"]
