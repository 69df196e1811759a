"""`[storage] url`: where shared snapshots go, parsed once and checked strictly.

Stdlib only and pure, so the config's checks use it too (a malformed url is a
config error at load, before anything is opened). A url never holds
credentials: S3 keys come from the standard AWS environment and files, and a
url with a user part is refused without echoing it, so a secret pasted there
never reaches a log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

FORMS = "s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()-]+$")  # S3's safe key characters


@dataclass(frozen=True, slots=True)
class StorageUrl:
    scheme: str  # "s3" or "file"
    bucket: str = ""  # s3 only
    prefix: str = ""  # s3: the key prefix, no leading or trailing "/" ("" for the bucket's top)
    path: str = ""  # file only: an absolute directory

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, job: str, name: str) -> str:
        """The object's key (s3) or relative path (file): PREFIX/JOB/NAME."""
        return "/".join(part for part in (self.prefix, job, name) if part)

    def where(self, job: str, name: str) -> str:
        """The object as a url, to show (never with credentials: a url holds none)."""
        if self.scheme == "file":
            return f"file://{PurePosixPath(self.path) / job / name}"
        return f"s3://{self.bucket}/{self.key(job, name)}"


def parse_url(text: str) -> StorageUrl:
    """The url's parts, or ValueError saying what is wrong (never quoting a credential)."""
    if "\0" in text or any(c.isspace() for c in text):
        raise ValueError(f"must be {FORMS}, without spaces or control characters")
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise ValueError(
            "must not hold credentials (the url is left out of this message); give them in "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"must be {FORMS}, without ?query or #fragment; got {json.dumps(text)}")
    if parts.scheme == "s3":
        return _s3(parts.netloc, parts.path, text)
    if parts.scheme == "file":
        return _file(parts.netloc, parts.path, text)
    raise ValueError(f"must be {FORMS}; got {json.dumps(text)}")


def url_problem(text: str) -> str | None:
    """What is wrong with the url, or None: the config's check."""
    try:
        parse_url(text)
    except ValueError as exc:
        return str(exc)
    return None


def _s3(bucket: str, path: str, text: str) -> StorageUrl:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"bucket {json.dumps(bucket)} is not an S3 bucket name (3 to 63 of a-z 0-9 . -) in s3://BUCKET/PREFIX; got {json.dumps(text)}")
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if segment in (".", "..") or not _SEGMENT.match(segment):
            raise ValueError(f"prefix part {json.dumps(segment)} is not allowed (letters, digits, !_.*'()-); got {json.dumps(text)}")
    return StorageUrl("s3", bucket=bucket, prefix="/".join(segments))


def _file(host: str, path: str, text: str) -> StorageUrl:
    if host not in ("", "localhost"):
        raise ValueError(f"a file url names a local path (file:///PATH), not host {json.dumps(host)}; got {json.dumps(text)}")
    path = unquote(path)
    if not path.startswith("/") or path == "/":
        raise ValueError(f"must name an absolute directory other than /, as file:///shared/ckpt; got {json.dumps(text)}")
    if any(part in (".", "..") for part in path.split("/")):
        raise ValueError(f"must not contain . or .. parts; got {json.dumps(text)}")
    return StorageUrl("file", path=str(PurePosixPath(path)))
