"""Request bodies bounded before they are read, on Werkzeug's own parser.

Werkzeug already refuses a body longer than ``MAX_CONTENT_LENGTH`` from its headers (413)
and stops a chunked one at that length, caps a multipart body's parts (``MAX_FORM_PARTS``)
and each text part (``MAX_FORM_MEMORY_SIZE``). What it cannot know, and this module adds:

- only the submission endpoint takes a large body; every other request gets
  ``SMALL_BODY_BYTES``;
- a file part must be a field a job has (``content``, ``style``): another is refused at
  its headers, before its data is read;
- each file part stops at ``max_image_bytes``, and is held in memory up to
  ``upload_memory_bytes``, in a temporary file past them (web/uploads.py has why);
- a urlencoded body, which Werkzeug reads whole, is bounded by ``MAX_FORM_MEMORY_SIZE``.
"""

from __future__ import annotations

import io
import tempfile
import typing
from typing import Any

from flask import Request, current_app, g
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import File

from shared.errors import ImageTooLarge, OptionError

#: File fields a submission may carry.
FILE_FIELDS = frozenset({"content", "style"})
#: Endpoints whose requests may carry images; the rest take at most SMALL_BODY_BYTES.
UPLOAD_ENDPOINTS = frozenset({"api.submit_job"})
SMALL_BODY_BYTES = 64 * 1024


class _BoundedFile(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """A file part, in memory up to ``in_memory`` bytes and in a temporary file past them
    (a stalled or slow upload then holds disk, not the process's memory), refused once it
    passes ``limit`` bytes."""

    def __init__(self, limit: int, name: str, in_memory: int) -> None:
        super().__init__(max_size=in_memory)
        self.limit, self.field = limit, name

    def write(self, data: typing.Any) -> int:
        if self.tell() + len(data) > self.limit:
            raise ImageTooLarge(
                f"the file is over the limit of {self.limit:,} bytes", field=self.field
            )
        return super().write(data)


class _MultiPartParser(MultiPartParser):
    def __init__(self, *args: Any, file_limit: int, in_memory: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.file_limit, self.in_memory = file_limit, in_memory

    def start_file_streaming(
        self, event: File, total_content_length: int | None
    ) -> typing.IO[bytes]:
        if event.name not in FILE_FIELDS:
            raise OptionError(
                f"unexpected file field {event.name!r}; send images as content or style",
                field=event.name,
            )
        part = _BoundedFile(self.file_limit, event.name, self.in_memory)
        # Closed when the request ends, however it ends: a body refused halfway leaves
        # its parts (temporary files past in_memory) with no one else to close them.
        g.setdefault("upload_parts", []).append(part)
        return part


class _FormDataParser(FormDataParser):
    def _parse_multipart(
        self,
        stream: typing.IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str],
    ) -> Any:
        parser = _MultiPartParser(
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
            file_limit=current_app.config["SETTINGS"].max_image_bytes,
            in_memory=current_app.config["SETTINGS"].upload_memory_bytes,
        )
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files

    def _parse_urlencoded(
        self,
        stream: typing.IO[bytes],
        mimetype: str,
        content_length: int | None,
        options: dict[str, str],
    ) -> Any:
        limit = self.max_form_memory_size
        if limit is not None:
            # Werkzeug reads a urlencoded body whole: read one byte past the limit at most.
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise RequestEntityTooLarge(f"a form is over the limit of {limit:,} bytes")
            stream = io.BytesIO(body)
        return super()._parse_urlencoded(stream, mimetype, content_length, options)


class BoundedRequest(Request):
    """Flask's request with the bounds above (``app.request_class``)."""

    form_data_parser_class = _FormDataParser

    @property
    def max_content_length(self) -> int | None:
        limit = super().max_content_length
        endpoint = self.url_rule.endpoint if self.url_rule is not None else None
        if endpoint in UPLOAD_ENDPOINTS or limit is None:
            return limit
        return min(limit, SMALL_BODY_BYTES)

    @max_content_length.setter
    def max_content_length(self, value: int | None) -> None:
        self._max_content_length = value


def close_upload_parts(_: BaseException | None = None) -> None:
    """At the end of a request (``teardown_request``): close the file parts it parsed."""
    for part in g.pop("upload_parts", []):
        part.close()
