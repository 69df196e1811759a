"""Shared checkpoint storage (`[storage] url`): snapshots uploaded in the background
to S3 or a shared filesystem, and fetched when a job starts on another node.

`url` parses the setting (pure; the config's checks use it), `objects` is the
narrow protocol of a store with its `file` and `s3` implementations, `uploader`
is the background thread that is the supervisor's `SnapshotStore` port, and
`build` opens and checks the store at daemon start. Nothing here is imported by
the package itself, so the config can use `url` without pulling in the rest.
"""
