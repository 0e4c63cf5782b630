"""The style-transfer engine: Gatys et al.'s optimization as a pure-torch library.

No Celery, Flask or database here. The public surface is :func:`stylize` with its
:class:`Iterate`, :class:`Result` and :class:`Checkpoint`; importing this package does not
import torch (a run does), so option checks and defaults are cheap to reach.
"""

from worker.engine.checkpoint import Checkpoint
from worker.engine.registry import BACKBONES, DEFAULT_BACKBONE, OFFLINE_BACKBONE
from worker.engine.stylize import Iterate, Result, check_options, defaults, stylize

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "OFFLINE_BACKBONE",
    "Checkpoint",
    "Iterate",
    "Result",
    "check_options",
    "defaults",
    "stylize",
]
