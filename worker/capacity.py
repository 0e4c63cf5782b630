"""What a worker offers: its host, device, memory and the queues it consumes."""

from __future__ import annotations

import functools
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings
from shared.routing import GIB, worker_queues


@dataclass(frozen=True)
class Capacity:
    host: str
    kind: str  #: ``gpu`` or ``cpu``
    device: str  #: the torch device, e.g. ``cuda:0``
    device_name: str  #: e.g. ``NVIDIA H200`` or the CPU model
    memory_bytes: int  #: memory offered to jobs (free at start, or configured)
    queues: tuple[str, ...]


def available_ram_bytes() -> int:
    """MemAvailable on Linux; else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def measure(settings: Settings) -> Capacity:
    """What this process offers, measured once (its first call)."""
    import torch

    from worker.engine.device import resolve_device

    device = resolve_device(settings.device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        kind, name, memory = "gpu", torch.cuda.get_device_name(device), int(free)
    else:  # the CPU (and Apple's MPS, which shares the machine's RAM)
        kind, name, memory = "cpu", cpu_model(), available_ram_bytes()
    if settings.worker_memory_gb > 0:
        memory = int(settings.worker_memory_gb * GIB)
    return Capacity(
        host=settings.host_name or socket.gethostname(),
        kind=kind,
        device=str(device),
        device_name=name,
        memory_bytes=memory,
        queues=tuple(worker_queues(settings.queue, kind, memory)),
    )
