"""A store in an S3 bucket: `s3://BUCKET/PREFIX`, through boto3 (imported only here).

Endpoint, region and credentials are boto3's own: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config
(addressing_style for path-style stores), as every S3 tool reads them. An
object's sha256 and creation time are its user metadata, written in the same
request, so a listed object always has them. Large files go up in parts
(s3transfer); an interrupted upload leaves no object, only parts that a bucket
lifecycle rule for incomplete multipart uploads removes. Every message built
from an error has the known secrets replaced, so none reaches an event or a log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gpuguard.storage.objects import SNAPSHOT_NAME, SUFFIX, StorageMisconfigured, newest_first
from gpuguard.storage.url import StorageUrl
from gpuguard.supervisor.ports import StoredSnapshot, StorageUnavailable

PART_BYTES = 64 * 1024 * 1024
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}
_NO_BUCKET = {"NoSuchBucket", "404", "NotFound"}


class S3Store:
    def __init__(self, url: StorageUrl, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0) -> None:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise StorageMisconfigured(f"[storage] url {url}: boto3 is not installed; pip install 'gpuguard[s3]'") from None
        self.url = url
        session = boto3.session.Session()
        creds = session.get_credentials()
        found = [creds.secret_key, creds.token] if creds is not None else []
        self._secrets = [s for s in [*found, *(os.environ.get(v) for v in _SECRET_VARS)] if s and len(s) >= 4]

        def client(attempts: int, connect_s: float, read_s: float) -> Any:
            return session.client("s3", config=Config(
                connect_timeout=connect_s, read_timeout=read_s, retries={"max_attempts": attempts, "mode": "standard"},
                # our own sha256 guards the bytes end to end; this keeps older S3-compatible stores working
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
            ))  # fmt: skip

        self._client = client(2, connect_timeout_s, read_timeout_s)
        self._probe = client(1, min(connect_timeout_s, 3.0), min(read_timeout_s, 5.0))
        self._transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4)

    def check(self) -> None:
        """head_bucket, one try with a short timeout."""
        try:
            self._probe.head_bucket(Bucket=self.url.bucket)
        except Exception as exc:
            lasting, text = self._explain(exc, "cannot reach the bucket")
            raise (StorageMisconfigured(text) if lasting else StorageUnavailable(text)) from None

    def put(self, job: str, snapshot_id: str, path: Path, sha256: str, created: float) -> None:
        meta = {"Metadata": {"sha256": sha256, "created": repr(created)}}
        key = self.url.key(job, f"{snapshot_id}{SUFFIX}")
        self._call(f"cannot store {snapshot_id}", self._client.upload_file, str(path), self.url.bucket, key, ExtraArgs=meta, Config=self._transfer)

    def list(self, job: str) -> list[StoredSnapshot]:
        start = self.url.key(job, "") + "/"
        found: list[StoredSnapshot] = []
        pages = self._call("cannot list", lambda: list(self._client.get_paginator("list_objects_v2").paginate(Bucket=self.url.bucket, Prefix=start)))
        for page in pages:
            for obj in page.get("Contents", []):
                name = obj["Key"][len(start) :]
                snap_id = name[: -len(SUFFIX)]
                if "/" in name or not name.endswith(SUFFIX) or not SNAPSHOT_NAME.match(snap_id):
                    continue
                head = self._call(f"cannot read {snap_id}", self._client.head_object, Bucket=self.url.bucket, Key=obj["Key"])
                meta = head.get("Metadata", {})
                try:
                    found.append(StoredSnapshot(job, snap_id, int(head["ContentLength"]), str(meta["sha256"]), float(meta["created"]), self.url.where(job, name)))
                except (KeyError, ValueError):
                    continue  # not written by gpuguard: no sha256 to check it against
        return newest_first(found)

    def get(self, snapshot: StoredSnapshot, dest: Path) -> None:
        key = self.url.key(snapshot.job, f"{snapshot.id}{SUFFIX}")
        try:
            self._call(f"cannot read {snapshot.id}", self._client.download_file, self.url.bucket, key, str(dest), Config=self._transfer)
        except StorageUnavailable:
            dest.unlink(missing_ok=True)
            raise

    def delete(self, job: str, snapshot_id: str) -> None:
        key = self.url.key(job, f"{snapshot_id}{SUFFIX}")
        self._call(f"cannot delete {snapshot_id}", self._client.delete_object, Bucket=self.url.bucket, Key=key)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Every boto3 failure becomes StorageUnavailable with a message free of secrets."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise StorageUnavailable(self._explain(exc, what)[1]) from None

    def _explain(self, exc: Exception, what: str) -> tuple[bool, str]:
        """(lasting: no bucket, denied or no credentials; the message naming the url)."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"[storage] url {self.url}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return True, f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        # s3transfer wraps the service's answer (S3UploadFailedError): look at what it wraps
        error = next((e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, ClientError)), None)
        if error is not None:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NO_BUCKET and what == "cannot reach the bucket":
                return True, f"{where}: bucket {self.url.bucket!r} does not exist"
            if code in _DENIED or status == 403:
                return True, self._redact(f"{where}: access denied ({code}): wrong credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or no permission on the bucket")
            return False, self._redact(f"{where}: {what}: {code or status}: {error}")
        return False, self._redact(f"{where}: {what}: {type(exc).__name__}: {exc}")

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
