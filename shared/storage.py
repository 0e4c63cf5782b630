"""Where files live, behind a small interface: a local folder (one machine) or an
S3-compatible bucket (several machines).

Keys are relative paths such as ``images/ab/abcd….png`` or ``jobs/<id>/result.png``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.config import Settings
from shared.errors import OptionError

# -- Where a job's files live. --------------------------------------------------------


def checkpoint_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/checkpoint.npz"


def preview_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/preview.png"


def fast_preview_key(job_id: uuid.UUID) -> str:
    """The feed-forward picture (worker/instant.py), kept apart from the optimizer's
    previews: an optimization job with ``init=fast`` starts from it."""
    return f"jobs/{job_id}/fast-preview.png"


def result_key(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/result.png"


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class FileStorage:
    """Files under a root directory, each written atomically (temp file, then rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key escapes the root: {key!r}")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage:
    """Objects in an S3-compatible bucket under a prefix: what every machine can reach, so
    that any worker can resume any job and any web process can serve any result."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key escapes the prefix: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None
        return response["Body"].read()  # type: ignore[no-any-return]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


def storage_from_settings(settings: Settings) -> Storage:
    """``settings.storage_url``: empty (``data_dir/files``), a folder, or ``s3://bucket/prefix``."""
    url = settings.storage_url
    if not url:
        return FileStorage(Path(settings.data_dir) / "files")
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise OptionError("s3:// URLs name a bucket: s3://bucket/prefix", field="storage_url")
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region or None,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )
        return S3Storage(parts.netloc, parts.path, client)
    if parts.scheme in ("", "file"):
        return FileStorage(Path(parts.path))
    raise OptionError(
        f"unknown storage {parts.scheme!r}: use a folder or s3://", field="storage_url"
    )
