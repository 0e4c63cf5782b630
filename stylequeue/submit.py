"""``stylequeue submit``: send a job to a server, follow its event stream, save the result."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

from shared.errors import StylequeueError
from shared.models import JobStatus


class ServerError(StylequeueError):
    code = "server_error"


def _check(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code >= 400:
        error = body.get("error", {})
        field = error.get("field")
        message = error.get("message") or f"HTTP {response.status_code}"
        raise ServerError(message, field=field)
    return body  # type: ignore[no-any-return]


def client(token: str | None) -> requests.Session:
    """An HTTP session sending ``token`` (when the server requires tokens)."""
    http = requests.Session()
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
    return http


def submit(
    http: requests.Session,
    server: str,
    content: Path,
    styles: Sequence[Path],
    options: dict[str, str],
) -> dict[str, Any]:
    for path in (content, *styles):
        if not path.is_file():
            raise StylequeueError(f"no such file: {path}")
    with ExitStack() as stack:
        files = [("content", (content.name, stack.enter_context(content.open("rb"))))]
        files += [("style", (p.name, stack.enter_context(p.open("rb")))) for p in styles]
        try:
            response = http.post(f"{server}/api/jobs", files=files, data=options, timeout=60)
        except requests.RequestException as error:
            raise ServerError(f"cannot reach {server}: {error}") from None
    return _check(response)


#: How often the job is polled while the server has no event stream to spare.
POLL_SECONDS = 2.0


def events(
    http: requests.Session, server: str, links: dict[str, str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from the job's Server-Sent Events stream (``links`` are the
    job's), reconnecting where it broke. While the server refuses a stream (503
    ``streams_busy``: its places are all taken), the same events come from polling the
    job and its loss points, until the server's ``Retry-After`` has passed."""
    last_id = 0
    while True:
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last_id)}
        retry_after = 0.0
        try:
            with http.get(server + links["events"], headers=headers, stream=True,
                          timeout=60) as stream:  # fmt: skip
                if _streams_busy(stream):
                    retry_after = float(stream.headers.get("Retry-After") or POLL_SECONDS)
                elif stream.status_code >= 400:
                    _check(stream)
                else:
                    for event_id, event, payload in _stream_events(stream, last_id):
                        last_id = event_id  # where a reconnection resumes
                        yield event, payload
                        if event == "done":
                            return
        except requests.RequestException:
            continue  # dropped: reconnect with Last-Event-ID
        if retry_after:
            until = time.monotonic() + retry_after
            while True:
                for event, data in _polled(http, server, links, last_id):
                    if event == "loss":
                        last_id = data["iteration"]
                    yield event, data
                    if event == "done":
                        return
                if time.monotonic() >= until:
                    break
                time.sleep(POLL_SECONDS)


def _stream_events(
    stream: requests.Response, last_id: int
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of each event of a Server-Sent Events response; the id is the
    latest the stream gave (``last_id`` until it gives one)."""
    event, data = "message", ""
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("id:"):
            last_id = int(line[3:].strip())
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif line == "" and data:
            yield last_id, event, json.loads(data)
            event, data = "message", ""


def _streams_busy(response: requests.Response) -> bool:
    if response.status_code != 503:
        return False
    try:
        return bool(response.json()["error"]["code"] == "streams_busy")
    except (ValueError, KeyError, TypeError):
        return False


def _polled(
    http: requests.Session, server: str, links: dict[str, str], after: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events a stream would have sent since loss point ``after``, from one poll of the
    job and its loss points (the status first: every point of a finished job is in)."""
    job = _check(http.get(server + links["self"], timeout=30))
    finished = JobStatus(job["status"]).finished
    while True:
        page = _check(http.get(server + links["losses"], params={"after": after}, timeout=30))
        for point in page["points"]:
            yield "loss", {**point, "of": job["progress"]["total"]}
            after = point["iteration"]
        if not page["points"] or not finished:
            break  # a running job's later pages come at the next poll
    yield "status", {"status": job["status"], "attempts": job["attempts"]}
    if finished:
        yield "done", {"status": job["status"]}


def _follow_events(http: requests.Session, server: str, job: dict[str, Any], bar: Any) -> str:
    """The job's status once it ends, its loss points shown meanwhile (its event stream)."""
    status = str(job["status"])
    for event, data in events(http, server, job["links"]):
        if event == "loss":
            bar.update(data["iteration"] - bar.n)
            bar.set_postfix(loss=f"{data['total']:.4g}")
        elif event in ("status", "done"):
            status = data["status"]
    return status


def _follow_parts(http: requests.Session, server: str, job: dict[str, Any], bar: Any) -> str:
    """A batch's or video's status once it ends, its parts' iterations shown meanwhile (its
    event stream carries its status, not its parts' loss points)."""
    while True:
        job = _check(http.get(server + job["links"]["self"], timeout=30))
        bar.update(job["progress"]["iteration"] - bar.n)
        bar.set_postfix(parts=f"{job['parts']['done']}/{job['parts']['total']}")
        if job["status"] in ("succeeded", "failed", "canceled"):
            return str(job["status"])
        time.sleep(POLL_SECONDS)


def submit_and_wait(
    server: str,
    content: Path,
    styles: Sequence[Path],
    options: dict[str, str],
    output: Path | None,
    wait: bool,
    token: str | None = None,
) -> int:
    server = server.rstrip("/")
    http = client(token)
    job = submit(http, server, content, styles, options)
    print(f"job {job['id']} {job['status']}: {server}{job['links']['page']}", flush=True)
    if not wait:
        return 0
    from tqdm import tqdm

    bar = tqdm(total=job["progress"]["total"], unit="it", file=sys.stderr, leave=False)
    if "parts" in job:  # a batch or video: its parts' progress, polled
        status = _follow_parts(http, server, job, bar)
    else:
        status = _follow_events(http, server, job, bar)
    bar.close()
    if status != "succeeded":
        final = _check(http.get(server + job["links"]["self"], timeout=30))
        detail = final.get("error") or {}
        message = f"job {job['id']} {status}"
        if detail:
            message += f": {detail.get('code')}: {detail.get('message')}"
        raise ServerError(message)
    extension = {"video": "mp4", "batch": "zip"}.get(job.get("kind", ""), "png")
    output = output or Path(f"stylequeue-{job['id']}.{extension}")
    response = http.get(server + job["links"]["result"], timeout=60)
    _check(response)
    output.write_bytes(response.content)
    print(f"done: {output}")
    return 0
