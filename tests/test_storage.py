"""Atomic writes never leave a half-written artifact under the final name; hashes follow content."""

import pytest

from veorl.storage import (
    S3Location,
    artifact_hash,
    atomic_path,
    atomic_write_json,
    read_json,
    record_content_hash,
    redact,
    sha256_file,
    tree_hash,
)


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
    assert (
        redact("cannot reach https://alice:pa55word@mlflow.example.org/api")
        == "cannot reach https://<redacted>@mlflow.example.org/api"
    )


def test_content_hash_is_recorded_once_and_read_back(tmp_path):
    art = tmp_path / "artifact"
    (art / "sub").mkdir(parents=True)
    (art / "sub" / "weights.bin").write_bytes(b"w" * 100)
    atomic_write_json(art / "provenance.json", {"config": {"preset": "smoke"}, "upstream": {"x": "1"}})
    computed = artifact_hash(art)  # nothing recorded yet: the files' hash, provenance.json left out
    assert computed == tree_hash(art, exclude=("provenance.json",))

    assert record_content_hash(art) == computed
    prov = read_json(art / "provenance.json")
    assert prov["content_hash"] == computed and prov["upstream"] == {"x": "1"}  # the rest of provenance is kept
    # Readers take the record and do not hash again: a file changed behind the writer's back goes unnoticed.
    (art / "sub" / "weights.bin").write_bytes(b"changed")
    assert artifact_hash(art) == computed

    mtime = (art / "provenance.json").stat().st_mtime_ns
    assert record_content_hash(art, computed) == computed
    assert (art / "provenance.json").stat().st_mtime_ns == mtime  # an unchanged hash is not rewritten
    assert record_content_hash(art, "manifest-hash") == "manifest-hash"
    assert artifact_hash(art) == "manifest-hash"


def test_content_hash_of_a_folder_without_provenance_and_of_no_folder(tmp_path):
    art = tmp_path / "plain"
    art.mkdir()
    (art / "a.txt").write_text("a")
    assert artifact_hash(art) == tree_hash(art)
    assert record_content_hash(art) == tree_hash(art, exclude=("provenance.json",))
    assert read_json(art / "provenance.json") == {"content_hash": tree_hash(art, exclude=("provenance.json",))}
    for call in (artifact_hash, record_content_hash):
        with pytest.raises(FileNotFoundError):
            call(tmp_path / "missing")


def test_clips_and_dataset_hashes_prefer_the_recorded_one(tmp_path):
    from veorl.data.clips import MANIFEST, clips_hash
    from veorl.data.episodes import CARD, dataset_hash

    for name, hash_of in ((MANIFEST, clips_hash), (CARD, dataset_hash)):
        folder = tmp_path / name
        folder.mkdir()
        atomic_write_json(folder / name, {"entries": [1, 2]})
        assert hash_of(folder) == hash_of(folder, recorded=False) == sha256_file(folder / name)
        record_content_hash(folder, hash_of(folder, recorded=False))
        atomic_write_json(folder / name, {"entries": [1, 2, 3]})
        # Every reader agrees on the recorded hash; recorded=False is what the writing step computes.
        assert hash_of(folder) == artifact_hash(folder) != hash_of(folder, recorded=False)


def test_torch_artifacts_are_byte_identical_for_equal_tensors(tmp_path):
    """A re-run that saves the same weights must not change an artifact's content hash (torch.save to a path
    names its archive after the random temporary file)."""
    import torch

    from veorl.storage import atomic_torch_save

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    atomic_torch_save(tmp_path / "a" / "weights.pt", state)
    atomic_torch_save(tmp_path / "b" / "weights.pt", {k: v.clone() for k, v in state.items()})
    assert (tmp_path / "a" / "weights.pt").read_bytes() == (tmp_path / "b" / "weights.pt").read_bytes()
    loaded = torch.load(tmp_path / "a" / "weights.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and not list(tmp_path.glob("*/.*"))  # no temporary left
