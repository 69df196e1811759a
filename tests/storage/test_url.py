"""`[storage] url` parsing: the two forms, and clear refusals that never echo a credential."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuguard.config import ConfigError, load
from gpuguard.storage.url import StorageUrl, parse_url


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("s3://ckpt", StorageUrl("s3", bucket="ckpt")),
        ("s3://ckpt/", StorageUrl("s3", bucket="ckpt")),
        ("s3://ckpt/team/run-1", StorageUrl("s3", bucket="ckpt", prefix="team/run-1")),
        ("s3://my.bucket-2//a//b/", StorageUrl("s3", bucket="my.bucket-2", prefix="a/b")),
        ("file:///shared/ckpt", StorageUrl("file", path="/shared/ckpt")),
        ("file://localhost/shared/ckpt/", StorageUrl("file", path="/shared/ckpt")),
    ],
)
def test_the_two_forms(text: str, parsed: StorageUrl) -> None:
    assert parse_url(text) == parsed


def test_keys_and_where() -> None:
    s3 = parse_url("s3://ckpt/team")
    assert s3.key("yolo", "x.pt") == "team/yolo/x.pt"
    assert s3.where("yolo", "x.pt") == "s3://ckpt/team/yolo/x.pt"
    assert parse_url("s3://ckpt").key("yolo", "x.pt") == "yolo/x.pt"
    assert parse_url("file:///shared").where("yolo", "x.pt") == "file:///shared/yolo/x.pt"
    assert str(s3) == "s3://ckpt/team"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("ckpt", "must be s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"),
        ("gs://ckpt/x", "must be s3://BUCKET/PREFIX or file:///ABSOLUTE/PATH"),
        ("s3://", "is not an S3 bucket name"),
        ("s3://Bad_Bucket/x", "is not an S3 bucket name"),
        ("s3://ckpt/a/../b", "prefix part \"..\" is not allowed"),
        ("s3://ckpt/x?versionId=1", "without ?query"),
        ("file://shared/ckpt", "not host \"shared\""),
        ("file:///", "absolute directory other than /"),
        ("file:///a/../b", "must not contain . or .. parts"),
        ("s3://ckpt/a b", "without spaces"),
    ],
)
def test_malformed_urls_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_url(text)
    assert says in str(info.value)


def test_credentials_in_the_url_are_refused_without_being_echoed() -> None:
    with pytest.raises(ValueError) as info:
        parse_url("s3://AKIAXXXX:SeCrEtMaRkEr@ckpt/x")
    assert "SeCrEtMaRkEr" not in str(info.value) and "AKIAXXXX" not in str(info.value)
    assert "AWS_ACCESS_KEY_ID" in str(info.value)


def test_a_malformed_url_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[storage]\nurl = "s3:/ckpt"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "storage.url"
    assert "s3://BUCKET/PREFIX" in str(info.value)


def test_unset_is_local_only(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[storage]\n")
    assert load(path).storage.url == ""
