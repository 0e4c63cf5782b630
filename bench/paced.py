"""Requests at a fixed rate (open loop), timed from when each was due: the latency clients
see when the service handles a given load, as wrk2 measures it (wrk, Debian's, has no fixed
rate; its clients send again as soon as they are answered).

Each of ``clients`` keep-alive connections sends one request every ``clients / rate``
seconds, the connections staggered evenly, so that together they send ``rate`` per second.
A request's latency runs from the moment it was due, not from the moment it was sent: a
connection still waiting for its last answer sends late, and that wait counts. Without it
(coordinated omission) a stall of the server would delay the requests due during it and
hide them from the tail.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class PacedRun:
    #: Answers received per second.
    answered_rate: float
    #: Latency percentiles in ms, from when each request was due: "50", "90", "99".
    latency: dict[str, float]
    #: Answers other than 200.
    errors: int
    #: Requests not answered before the run's end (they count as errors too).
    unanswered: int


async def _connection(
    host: str,
    port: int,
    path: str,
    first_due: float,
    interval: float,
    until: float,
    latencies: list[float],
    statuses: list[int],
) -> int:
    """Requests due at ``first_due + k·interval`` on one connection until ``until``; returns
    how many were due but not answered."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    due = first_due
    try:
        while due < until:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                # The server closed the idle connection (gunicorn's keep-alive: 2 s): as a
                # client does, a new one, the same request, its wait counted.
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            await reader.readexactly(int(headers.get(b"content-length", 0)))
            latencies.append(time.perf_counter() - due)
            statuses.append(status)
            due += interval
            if headers.get(b"connection") == b"close":  # the server asks for a new one
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    except asyncio.CancelledError:
        pass
    finally:
        writer.close()
    return max(0, int(np.ceil((until - due) / interval)))


async def _run(
    host: str, port: int, path: str, rate: float, clients: int, seconds: float
) -> PacedRun:
    interval = clients / rate
    latencies: list[float] = []
    statuses: list[int] = []
    start = time.perf_counter() + 0.2  # time for the connections to open
    until = start + seconds
    tasks = []
    for i in range(clients):
        first_due = start + i * interval / clients
        connection = _connection(host, port, path, first_due, interval, until, latencies, statuses)
        tasks.append(asyncio.create_task(connection))
    # Answers still owed at the end get a grace of one second, then count as unanswered.
    _, pending = await asyncio.wait(tasks, timeout=seconds + 1.2)
    for task in pending:
        task.cancel()
    unanswered = sum(await asyncio.gather(*tasks))
    milliseconds = np.array(latencies) * 1000
    errors = sum(1 for status in statuses if status != 200) + unanswered
    return PacedRun(
        answered_rate=len(latencies) / seconds,
        latency={
            p: float(np.percentile(milliseconds, int(p))) if len(milliseconds) else float("nan")
            for p in ("50", "90", "99")
        },
        errors=errors,
        unanswered=unanswered,
    )


def paced(
    host: str, port: int, path: str, *, rate: float, clients: int, seconds: float
) -> PacedRun:
    """``rate`` requests per second of ``GET path`` over ``clients`` connections for
    ``seconds``; latencies from when each request was due."""
    return asyncio.run(_run(host, port, path, rate, clients, seconds))
