"""Atomic writes never leave a half-written artifact under the final name; hashes follow content."""

import pytest

from veorl.storage import S3Location, atomic_path, atomic_write_json, read_json, redact, tree_hash


def test_atomic_path_failure_leaves_previous_content_and_no_temp(tmp_path):
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]


def test_atomic_json_round_trip_readable_by_others(tmp_path):
    atomic_write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a" / "b.json") == {"x": [1, 2]}
    assert (tmp_path / "a" / "b.json").stat().st_mode & 0o777 == 0o644


def test_tree_hash_tracks_content_and_names(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("a")
    h1 = tree_hash(tmp_path)
    (tmp_path / "d" / "f.txt").write_text("b")
    h2 = tree_hash(tmp_path)
    (tmp_path / "d" / "f.txt").rename(tmp_path / "d" / "g.txt")
    h3 = tree_hash(tmp_path)
    assert len({h1, h2, h3}) == 3
    assert tree_hash(tmp_path, exclude=("d",)) == tree_hash(tmp_path / "nonexistent")


def test_s3_uri_parsing_and_redaction(monkeypatch):
    loc = S3Location.parse("s3://bucket/some/prefix")
    assert (loc.bucket, loc.key, loc.uri()) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    with pytest.raises(ValueError):
        S3Location.parse("s3:///nokey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    assert "sekrit" not in redact("failed with key sekrit-value-123")
    assert redact("cannot reach https://alice:pa55word@mlflow.example.org/api") == \
        "cannot reach https://<redacted>@mlflow.example.org/api"
