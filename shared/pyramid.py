"""The pyramid and the sizes of a run: what the service (estimates, memory, routing) and the
engine both compute from the options, so that both compute them alike."""

from __future__ import annotations

#: The smallest long side of any scale (the options' ``size`` too).
MIN_SIZE = 16
MAX_SCALES = 6
#: The automatic pyramid halves the size while the coarsest scale stays at least this long.
AUTO_PYRAMID_MIN_SIDE = 128
#: L-BFGS's curvature pairs: the default count, the most a run may ask for, and the memory
#: the default keeps them under (each pair: s and y, fp32, 3 channels: 24 B a pixel).
LBFGS_HISTORY = 100
MAX_LBFGS_HISTORY = 200
LBFGS_HISTORY_BUDGET_BYTES = 2 * 1024**3
LBFGS_PAIR_BYTES_PER_PIXEL = 24


def pyramid(size: int, scales: int, iterations: int) -> list[tuple[int, int]]:
    """(long side, iterations) per scale, coarsest first."""
    sides = [max(MIN_SIZE, round(size / 2 ** (scales - 1 - i))) for i in range(scales)]
    base, remainder = divmod(iterations, scales)
    counts = [base] * scales
    counts[-1] += remainder
    return list(zip(sides, counts, strict=True))


def auto_scales(size: int) -> int:
    scales = 1
    while scales < MAX_SCALES and size / 2**scales >= AUTO_PYRAMID_MIN_SIDE:
        scales += 1
    return scales


def plan_for(size: int, scales: int | None, iterations: int) -> list[tuple[int, int]]:
    """The pyramid of a job of these options (``scales`` None: the automatic choice), for
    the estimate of a job not yet submitted."""
    scales = min(scales or auto_scales(size), MAX_SCALES, iterations)
    return pyramid(size, scales, iterations)


def scaled_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) with the long side ``long_side`` and the aspect ratio kept."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def scaled_pixels(width: int, height: int, long_side: int) -> int:
    """Pixels of a ``width`` × ``height`` image resized so that its long side is
    ``long_side``."""
    new_width, new_height = scaled_size(width, height, long_side)
    return new_width * new_height


def lbfgs_history_for(pixels: int, history: int | None) -> int:
    """The pairs L-BFGS keeps on an image of ``pixels``: ``history`` if given, else
    LBFGS_HISTORY cut down to fit LBFGS_HISTORY_BUDGET_BYTES (never below 5)."""
    if history is not None:
        return history
    fits = LBFGS_HISTORY_BUDGET_BYTES // (LBFGS_PAIR_BYTES_PER_PIXEL * max(pixels, 1))
    return int(min(LBFGS_HISTORY, max(5, fits)))
