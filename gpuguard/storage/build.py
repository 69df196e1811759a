"""Open `[storage] url` at daemon start: parse, build the store, check it with one cheap
call, start the uploader.

A lasting mistake (a malformed url, no such bucket or directory, access denied,
no credentials, boto3 missing) is a ConfigError naming `storage.url`, which
gpuguardd turns into exit 2. A store that is only unreachable now is no reason
to leave GPUs unguarded: the daemon starts, a `storage_unavailable` event says
so, and uploads wait for it.
"""

from __future__ import annotations

from gpuguard.config import Config, ConfigError
from gpuguard.storage.filestore import FileStore
from gpuguard.storage.objects import ObjectStore, StorageMisconfigured
from gpuguard.storage.s3store import S3Store
from gpuguard.storage.uploader import Record, Uploader
from gpuguard.storage.url import parse_url
from gpuguard.supervisor.ports import NoStorage, SnapshotStore, StorageUnavailable


def open_storage(config: Config, record: Record) -> SnapshotStore:
    """NoStorage when no url is set; else a started Uploader. Raises ConfigError."""
    storage = config.storage
    if not storage.url:
        return NoStorage()
    try:
        store = open_store(storage.url)
        store.check()
    except StorageMisconfigured as exc:
        raise ConfigError(config.source, "storage.url", str(exc)) from None
    except StorageUnavailable as exc:
        down: str | None = str(exc)
    else:
        down = None
    uploader = Uploader(
        store, record, keep_newest=config.jobs.snapshots_keep,
        fetch_timeout_s=storage.fetch_timeout_s, retry_max_s=storage.upload_retry_max_s,
    )  # fmt: skip
    if down is not None:
        uploader.unavailable(down)
    uploader.start()
    return uploader


def open_store(text: str) -> ObjectStore:
    """The store a url names, not yet checked (also for bench/storage.py). Raises StorageMisconfigured."""
    try:
        url = parse_url(text)
    except ValueError as exc:
        raise StorageMisconfigured(f"[storage] url {exc}") from None
    return FileStore(url) if url.scheme == "file" else S3Store(url)
