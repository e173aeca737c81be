"""Episode format: round trip, validation, the importer's rejections, the store (no simulator needed)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.builders import make_episode, write_variants
from veorl.data.episodes import (
    EpisodeError,
    EpisodeStore,
    episode_files,
    episode_length,
    import_episodes,
    load_episode,
    save_episode,
    validate_episode,
)


def test_save_load_round_trip_preserves_every_array(tmp_path):
    ep = make_episode(T=7)
    path = save_episode(tmp_path / "episodes", 3, ep)
    assert path.name == "000003-7.npz"
    assert episode_length(path) == 7
    loaded = load_episode(path, image_size=16, action_dim=4)
    assert set(ep) <= set(loaded)
    for key, arr in ep.items():
        assert loaded[key].dtype == arr.dtype, key
        np.testing.assert_array_equal(loaded[key], arr, err_msg=key)
    assert not [p for p in (tmp_path / "episodes").iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_missing_success_is_filled_with_false():
    ep = make_episode()
    del ep["success"]
    out = validate_episode(ep)
    assert out["success"].dtype == bool and not out["success"].any()


def test_importer_rejects_each_bad_file_with_its_name_and_reason(tmp_path):
    expected = write_variants(tmp_path / "release")
    report = import_episodes(tmp_path / "release", tmp_path / "dataset")
    assert sorted(report.accepted) == ["good_a.npz", "good_b.npz"]
    reasons = dict(report.rejected)
    assert sorted(reasons) == sorted(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])
    files = episode_files(tmp_path / "dataset")
    assert [f.name for f in files] == ["000000-6.npz", "000001-6.npz"]
    np.testing.assert_array_equal(load_episode(files[1])["image"], make_episode(seed=2)["image"])


def test_truncated_archive_is_rejected_not_crashing(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez_compressed(path, **make_episode(T=20, size=32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeError, match="cut.npz"):
        load_episode(path)


def test_image_size_and_action_dim_are_checked(tmp_path):
    path = save_episode(tmp_path, 0, make_episode(size=16, action_dim=4))
    with pytest.raises(EpisodeError, match="expected 64x64"):
        load_episode(path, image_size=64)
    with pytest.raises(EpisodeError, match="expected 2"):
        load_episode(path, action_dim=2)


def test_store_samples_windows_from_episodes(tmp_path):
    for i, T in enumerate((8, 12)):
        save_episode(tmp_path / "episodes", i, make_episode(T=T, seed=i))
    store = EpisodeStore(tmp_path, cache_episodes=1)
    assert len(store) == 2 and store.total_steps == 20
    batch = store.sample(5, 6, np.random.default_rng(0))
    assert batch["image"].shape == (5, 6, 16, 16, 3) and batch["action"].shape == (5, 6, 4)
    with pytest.raises(ValueError, match="seq_len=13"):
        store.sample(1, 13, np.random.default_rng(0))
