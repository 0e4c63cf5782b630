"""What the service benches share: their service's settings and workers, waiting for a
condition, and writing their section of ``docs/benchmarks.md`` between its markers (each
bench owns one section)."""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import broker
from shared.config import Settings
from shared.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]


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


def machine() -> str:
    """The CPU the figures come from, e.g. ``x86_64 (AMD EPYC with AVX512-BF16), 2 cores``:
    machines here change from session to session, and their figures with them; the bf16
    instructions say which of the CPUs that share a model name it is."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or ["", ""])[1].split())
        extra = next(
            (f" with {name}" for flag, name in BF16_FLAGS if flag in flags),
            " without bf16 instructions" if flags else "",
        )
        model = f" ({found.group(1).strip()}{extra})" if found else ""
    return f"{platform.machine()}{model}, {os.cpu_count()} cores"


#: /proc/cpuinfo's flags for the CPUs' bf16 instructions, the fastest first.
BF16_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A confidence interval for the median of ``values``, from their order statistics
    (distribution-free: each value falls below the true median with probability one half,
    so the number below it is binomial). Its coverage is at least ``level``; with fewer
    than 6 values no interval reaches 95 %, and the whole range is returned."""
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - level) / 2
    # The largest k with P(Binomial(n, 1/2) < k) <= tail: [x_(k), x_(n-k+1)], 1-based.
    k, below = 0, 0.0
    while k < n // 2 and below + math.comb(n, k) / 2**n <= tail:
        below += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


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


def bench_settings(
    base: Path, redis_url: str, database_url: str | None = None, **overrides: Any
) -> Settings:
    """A bench's own service settings (a fresh SQLite file unless ``database_url``, its own
    queue, no per-client limits), with the database migrated."""
    settings = Settings.from_env(
        {},
        **{
            "database_url": database_url or f"sqlite:///{base / 'jobs.db'}",
            "redis_url": redis_url,
            "data_dir": base / "data",
            "queue": f"bench-{uuid.uuid4().hex[:6]}",
            "rate_limit_per_minute": 0,
            "submit_limit_per_minute": 0,
            "max_queued_per_client": 10_000,
            "offline": True,
            **overrides,
        },
    )
    upgrade(settings.database_url)
    return settings


def start_workers(
    settings: Settings, count: int, logs: Path, command: str = "worker", **env: str
) -> list[subprocess.Popen[bytes]]:
    """``count`` real ``stylequeue worker`` (or ``preview-worker``) processes, returned once
    all heartbeat."""
    processes = []
    client = broker.connect(settings.redis_url)
    before = len(broker.live_workers(client))
    for index in range(count):
        with (logs / f"{command}{index}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "stylequeue", command],
                    env={
                        **os.environ,
                        **settings.environ(),
                        **env,
                        "STYLEQUEUE_WORKER_NAME": f"bench-{command}{index}",
                    },
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            )
    wait(lambda: len(broker.live_workers(client)) >= before + count, 180, "the workers", every=0.1)
    return processes


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(30)
