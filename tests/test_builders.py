"""The shared fixtures and builders (tests/conftest.py, tests/builders.py) against the real readers.

If a reader's format changes, these fail here first, instead of as puzzling errors in the tests that use the fixtures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import builders
from veorl.config import PRESETS, CollectParams, ConfigError, load_params
from veorl.data.clips import ClipStore, clips_hash
from veorl.data.episodes import EPISODE_DIR, EpisodeStore, dataset_hash, import_episodes, load_episode
from veorl.storage import read_json, sha256_file

# ------------------------------------------------------------------------------------------------
# params
# ------------------------------------------------------------------------------------------------


def test_params_factory_gives_validated_smoke_params_that_load_params_reads_back(params, tmp_path):
    p = params("pretrain.batch=3", "finetune.lambda=0.5")
    assert p.preset == "smoke"
    assert p.pretrain.batch == 3 and p.finetune.lambda_ == 0.5
    assert p.model.deter == PRESETS["smoke"]["model"]["deter"]
    assert p.collect.episodes == PRESETS["smoke"]["collect"]["episodes"]
    # What the factory builds is exactly what a component would load from the same params.yaml.
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p.model_dump(by_alias=True, mode="json")))
    assert load_params(path) == p
    assert load_params(path, overrides=["pretrain.batch=4"]) != p


def test_params_factory_takes_a_raw_dict_and_rejects_what_load_params_rejects(params):
    p = params("ingest.stride=2", raw={"ingest": {"window": 8, "stride": 4}, "pretrain": {"source_len": 2}})
    assert (p.ingest.window, p.ingest.stride, p.pretrain.source_len) == (8, 2, 2)  # overrides win over raw
    assert params(preset="cpu").model.deter == PRESETS["cpu"]["model"]["deter"]
    with pytest.raises(ConfigError, match="pretrain.bogus: unknown key"):
        params("pretrain.bogus=1")
    with pytest.raises(ConfigError, match="pretrain.batch"):
        params("pretrain.batch=0")


# ------------------------------------------------------------------------------------------------
# mlflow_store
# ------------------------------------------------------------------------------------------------


def test_mlflow_store_is_a_fresh_sqlite_store_in_tmp_path(request, monkeypatch, tmp_path, params):
    monkeypatch.setenv("VEORL_PARENT_RUN_ID", "run-of-an-outer-pipeline")
    uri = request.getfixturevalue("mlflow_store")  # after the line above, so the fixture sees that variable
    assert uri.startswith("sqlite:///") and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert "VEORL_PARENT_RUN_ID" not in os.environ
    db = Path(uri.removeprefix("sqlite:///"))
    assert db.parent == tmp_path and not db.exists()

    from veorl import tracking

    assert tracking.tracking_uri(params()) == uri  # the environment wins over params.tracking.uri
    experiment = tracking.ensure_experiment("builders", uri)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    assert client.get_experiment(experiment).name == "builders"
    assert db.is_file()


# ------------------------------------------------------------------------------------------------
# clip_builder
# ------------------------------------------------------------------------------------------------


def test_clip_builder_writes_what_clip_store_reads(clip_builder):
    root = clip_builder(clips=5, window=6, stride=3, sources=2, clips_per_shard=2, failed=1, seed=4)
    store = ClipStore(root)
    assert len(store) == 10 and store.window == 6 and store.size == 64
    assert len(store.shard_paths) == 6  # per source: shards of 2, 2 and 1 clips; the failed source has none
    manifest = read_json(root / "manifest.json")
    assert manifest["totals"]["clips"] == 10 and manifest["totals"]["failed"] == 1 and manifest["complete"]
    assert [e["status"] for e in manifest["sources"]] == ["ok", "ok", "failed"]
    assert clips_hash(root) == sha256_file(root / "manifest.json")
    # Clip c of a source is frames [c*stride, c*stride + window) of its stream, in order across shards.
    stream = builders.moving_square_video(6 + 4 * 3, seed=4 * 1000 + 0)
    for c in range(5):
        np.testing.assert_array_equal(store.clip(c), stream[3 * c : 3 * c + 6], err_msg=f"clip {c}")
    batch = store.sample(3, 4, np.random.default_rng(0))
    assert batch.shape == (3, 4, 64, 64, 3) and batch.dtype == np.uint8


def test_clip_builder_defaults_fit_the_smoke_samplers(clip_builder, params):
    from veorl.data.samplers import ClipSampler

    p = params()
    store = ClipStore(clip_builder())
    assert store.window == p.ingest.window
    images = ClipSampler(store, p.pretrain.source_batch, p.pretrain.source_len, seed=0)(0)["image"]
    assert images.shape == (p.pretrain.source_batch, p.pretrain.source_len, 64, 64, 3)
    with pytest.raises(FileExistsError):
        clip_builder()  # a second dataset under the same name would silently mix with the first


def test_clip_manifest_has_the_fields_real_ingestion_writes(clip_builder, tmp_path, params):
    from veorl.video.encode import write_video
    from veorl.video.ingest import ingest

    video = tmp_path / "raw" / "square.mp4"
    video.parent.mkdir()
    write_video(video, builders.moving_square_video(20, seed=0), fps=10)
    real = ingest([str(video)], tmp_path / "ingested", params(), progress=False)
    built = read_json(clip_builder() / "manifest.json")
    assert set(built) == set(real)
    assert set(built["sources"][0]) == set(real["sources"][0])
    assert set(built["totals"]) == set(real["totals"]) and set(built["last_run"]) == set(real["last_run"])
    # Same clip settings, same settings hash: both describe clips cut the same way.
    assert built["params_hash"] == real["params_hash"]
    assert Path(built["sources"][0]["shards"][0]["file"]).parent == Path(real["sources"][0]["shards"][0]["file"]).parent


# ------------------------------------------------------------------------------------------------
# episode_builder
# ------------------------------------------------------------------------------------------------


def test_episode_builder_writes_what_episode_store_reads(episode_builder):
    root = episode_builder(episodes=3, length=12, seed=5)
    store = EpisodeStore(root, image_size=64)
    assert len(store) == 3 and store.total_steps == 36
    assert [p.name for p in store.files] == ["000000-12.npz", "000001-12.npz", "000002-12.npz"]
    for i in range(3):
        ep = load_episode(store.files[i], image_size=64, action_dim=4)  # validates keys, dtypes and ranges
        assert not ep["action"][0].any() and ep["reward"][0] == 0 and ep["is_first"][0] and not ep["is_first"][1:].any()
    batch = store.sample(2, 8, np.random.default_rng(0))
    assert batch["image"].shape == (2, 8, 64, 64, 3) and batch["action"].shape == (2, 8, 4)
    card = read_json(root / "card.json")
    assert (card["episodes"], card["steps"], card["frames"], card["episode_length"]) == (3, 33, 36, 11)
    assert card["success_rate"] == pytest.approx(2 / 3)  # episodes 0 and 2 succeed by default
    assert [row["seed"] for row in card["per_episode"]] == [5, 6, 7]
    assert dataset_hash(root) == sha256_file(root / "card.json")


def test_episode_builder_takes_one_length_per_episode(episode_builder):
    store = EpisodeStore(episode_builder(episodes=2, length=(30, 45)))
    assert list(store.lengths) == [30, 45] and store.total_steps == 75
    assert read_json(store.files[0].parents[1] / "card.json")["episode_length"] == 44
    with pytest.raises(ValueError, match="one length"):
        episode_builder("bad", episodes=3, length=(30, 45))


def test_episode_builder_matches_the_collection_layout(episode_builder, params):
    from veorl.algo.finetune import dataset_metadata
    from veorl.envs.collection import collect_dataset

    p = params()
    root = episode_builder(episodes=2, length=16, seed=0, successes=0)
    card_before = (root / "card.json").read_text()
    # Collection with the same settings finds every episode done: nothing to simulate, nothing rewritten.
    cfg = CollectParams.model_validate({**p.collect.model_dump(), "episodes": 2, "episode_length": 15, "seed": 0})
    result = collect_dataset(root, cfg, workers=1, progress=False)
    assert result.kept == [0, 1] and not result.collected and not result.changed
    assert (root / "card.json").read_text() == card_before
    assert json.loads(card_before)["success_rate"] == 0.0
    meta = dataset_metadata(root, p, action_dim=4)  # what fine-tuning and the agent take from the card
    assert meta["task"] == p.collect.task and meta["episode_length"] == 15 and meta["camera"] == p.collect.camera


def test_episode_variants_are_sorted_by_the_importer(tmp_path):
    expected = builders.write_variants(tmp_path / "release", size=16)
    report = import_episodes(tmp_path / "release", tmp_path / "imported", image_size=16, action_dim=4)
    assert sorted(report.accepted) == ["good_a.npz", "good_b.npz"]
    reasons = dict(report.rejected)
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    imported = sorted((tmp_path / "imported" / EPISODE_DIR).iterdir())
    np.testing.assert_array_equal(load_episode(imported[0])["image"], builders.make_episode(size=16, seed=1)["image"])


# ------------------------------------------------------------------------------------------------
# agent and evaluation artifacts
# ------------------------------------------------------------------------------------------------


def test_agent_and_evaluation_builders_satisfy_the_registry_and_the_agent_loader(tmp_path):
    from veorl.agent import Agent
    from veorl.registry import read_agent, read_evaluation

    agent_dir = builders.make_agent(tmp_path / "agent", seed=3)
    info = read_agent(agent_dir)
    assert info.meta["task"] == "drawer-open"
    good = read_evaluation(builders.write_evaluation(tmp_path / "eval", agent_dir, 0.5), info, "success_rate")
    assert good.problem is None and good.metrics["protocol"] == builders.EVALUATION_PROTOCOL
    nan = read_evaluation(builders.write_evaluation(tmp_path / "nan", agent_dir, float("nan")), info, "success_rate")
    assert "not a finite number" in nan.problem
    agent = Agent.load(str(agent_dir))
    action, _ = agent.act(np.zeros((1, 64, 64, 3), np.uint8), agent.initial_state(1))
    assert action.shape == (1, 4) and np.all(np.abs(action) <= 1)
    other = builders.make_agent(tmp_path / "other", seed=4)
    assert read_agent(other).content_hash != info.content_hash  # the seed makes the weights distinct
