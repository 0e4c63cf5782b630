"""The benches' statistics: the confidence interval that decides whether the job-overhead
goal is met (bench/report.py), checked against the binomial law it rests on."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import numpy as np

from tests.conftest import REPO


def load_bench_module(name: str) -> ModuleType:
    """bench/<name>.py, which the benches import as a script's neighbour."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while loading
    spec.loader.exec_module(module)
    return module


def below(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) < k)."""
    return sum(math.comb(n, i) for i in range(k)) / 2**n


def test_median_interval_is_the_widest_order_statistics_at_95_percent() -> None:
    median_interval = load_bench_module("report").median_interval
    for n, (low, high) in {15: (4, 12), 9: (2, 8), 6: (1, 6), 25: (8, 18)}.items():
        values = [float(i) for i in range(1, n + 1)]
        assert median_interval(values) == (low, high), n
        # Coverage at least 95 %, and one order statistic further in would fall short.
        assert 1 - 2 * below(n, low) >= 0.95
        assert 1 - 2 * below(n, low + 1) < 0.95
    # Too few values for 95 %: the whole range.
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)


def test_median_interval_covers_the_true_median() -> None:
    median_interval = load_bench_module("report").median_interval
    generator = np.random.default_rng(7)
    trials = 2000
    # Skewed, like run times: a lognormal whose median is exactly 1.
    covered = sum(
        low <= 1.0 <= high
        for low, high in (
            median_interval(generator.lognormal(0.0, 0.3, 15).tolist()) for _ in range(trials)
        )
    )
    # The exact coverage for n = 15 is 1 - 2 * P(X < 4) = 96.5 %; 2000 trials hold it
    # to about ±0.8 % (two standard errors).
    assert 0.95 <= covered / trials <= 0.98, covered / trials
