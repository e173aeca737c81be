"""Target dataset collection and import (components.collect) with the real simulator at smoke sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from components import collect
from tests.builders import make_episode, smoke_params, write_variants
from veorl.data.episodes import EpisodeStore, episode_files, load_episode
from veorl.envs.collection import collect_dataset, episode_level

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="metaworld not installed")

# 120 steps: long enough for the scripted expert to open the drawer (it needs ~90), short enough for tests.
MIXED = [
    "collect.quality=mixed",
    "collect.mixed_expert_fraction=0.5",
    "collect.episodes=3",
    "collect.episode_length=120",
    "collect.workers=1",
]


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("target") / "episodes_mixed"
    card = collect.run(str(out), smoke_params(*MIXED), progress=False)
    return out, card


def test_mixed_levels_spread_expert_episodes_evenly():
    assert [episode_level(i, "mixed", 0.5) for i in range(4)] == ["medium", "expert", "medium", "expert"]
    levels = [episode_level(i, "mixed", 0.3) for i in range(100)]
    assert levels.count("expert") == 30
    assert all(abs(levels[:n].count("expert") - 0.3 * n) <= 1 for n in range(1, 101))


def test_collected_episodes_have_the_offline_format(mixed_dataset):
    out, _ = mixed_dataset
    files = episode_files(out)
    assert [f.name for f in files] == ["000000-121.npz", "000001-121.npz", "000002-121.npz"]
    for path in files:
        ep = load_episode(path, image_size=64, action_dim=4)
        assert ep["image"].shape == (121, 64, 64, 3) and ep["image"].dtype == np.uint8
        assert ep["action"].shape == (121, 4) and ep["action"].dtype == np.float32
        assert np.all(ep["action"][0] == 0) and np.abs(ep["action"]).max() <= 1
        assert np.abs(ep["action"][1:]).sum() > 0
        assert ep["reward"].shape == (121,) and ep["reward"][0] == 0
        np.testing.assert_array_equal(ep["discount"], np.ones(121, np.float32))  # Meta-World only truncates
        assert ep["success"].dtype == bool and not ep["success"][0]
        assert not ep["is_terminal"].any()
        # Consecutive frames differ: the arm moves, and t holds the frame reached by action t.
        assert np.abs(ep["image"][1:].astype(int) - ep["image"][:-1].astype(int)).sum() > 0
    assert (out / "config.json").exists() and (out / "provenance.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["collect"]["quality"] == "mixed" and config["preset"] == "smoke"
    store = EpisodeStore(out, image_size=64)
    assert store.sample(2, 10, np.random.default_rng(0))["image"].shape == (2, 10, 64, 64, 3)


def test_card_numbers_equal_those_recomputed_from_the_files(mixed_dataset):
    out, card = mixed_dataset
    assert json.loads((out / "card.json").read_text()) == card
    episodes = [load_episode(p) for p in episode_files(out)]
    returns = np.array([ep["reward"].astype(np.float64).sum() for ep in episodes])
    successes = [bool(ep["success"].any()) for ep in episodes]
    assert card["episodes"] == 3
    assert card["steps"] == sum(len(ep["reward"]) - 1 for ep in episodes) == 360
    assert card["return_mean"] == pytest.approx(returns.mean())
    assert card["return_std"] == pytest.approx(returns.std())
    assert card["success_rate"] == pytest.approx(np.mean(successes))
    assert [row["return"] for row in card["per_episode"]] == pytest.approx(list(returns))
    assert [row["success"] for row in card["per_episode"]] == successes
    assert [row["level"] for row in card["per_episode"]] == ["medium", "expert", "medium"]
    assert [row["seed"] for row in card["per_episode"]] == [0, 1, 2]
    assert card["quality"] == "mixed" and card["task"] == "drawer-open" and card["camera"] == "corner"
    assert card["expert_episodes"] == 1
    # each episode records the task variation its seed started from (what the data covers)
    variations = [row["variation"] for row in card["per_episode"]]
    assert all(0 <= v < 50 for v in variations) and card["variations_started"] == len(set(variations))


def test_expert_succeeds_and_medium_does_worse(mixed_dataset):
    _, card = mixed_dataset
    rows = card["per_episode"]
    expert = [r for r in rows if r["level"] == "expert"]
    medium = [r for r in rows if r["level"] == "medium"]
    assert all(r["success"] for r in expert), "the expert opens the drawer within 120 steps"
    assert max(r["return"] for r in medium) < min(r["return"] for r in expert)


def test_rerun_with_same_params_writes_nothing(mixed_dataset, tmp_path):
    out, card = mixed_dataset
    before = mtimes(out)
    again = collect.run(str(out), smoke_params(*MIXED), progress=False)
    assert again == card
    assert mtimes(out) == before


SHORT = [
    "collect.quality=mixed",
    "collect.mixed_expert_fraction=0.5",
    "collect.episodes=3",
    "collect.episode_length=15",
    "collect.workers=1",
]


def test_resume_and_parameter_changes_redo_only_affected_episodes(tmp_path):
    out = tmp_path / "short"
    cfg = smoke_params(*SHORT).collect
    assert collect_dataset(out, cfg, progress=False).collected == [0, 1, 2]
    # A crash after episodes 0 and 1: episode 2 is missing, and only it is collected again.
    for path in [*out.glob("episodes/000002-*.npz"), out / "episode_meta" / "000002.json"]:
        path.unlink()
    assert collect_dataset(out, cfg, progress=False).collected == [2]
    # The expert noise shapes expert episodes only.
    noisier = cfg.model_copy(update={"expert_noise": 0.2})
    result = collect_dataset(out, noisier, progress=False)
    assert result.collected == [1] and result.kept == [0, 2]
    # Fewer episodes: the surplus files go.
    fewer = noisier.model_copy(update={"episodes": 2})
    result = collect_dataset(out, fewer, progress=False)
    assert result.collected == [] and sorted(result.removed) == ["episode_meta/000002.json", "episodes/000002-16.npz"]
    assert result.card["episodes"] == 2 and len(episode_files(out)) == 2


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    collect.run(str(tmp_path / "serial"), smoke_params(*SHORT), progress=False)
    collect.run(str(tmp_path / "parallel"), smoke_params(*SHORT, "collect.workers=2"), progress=False)
    for a, b in zip(episode_files(tmp_path / "serial"), episode_files(tmp_path / "parallel"), strict=True):
        ea, eb = load_episode(a), load_episode(b)
        for key in ea:
            np.testing.assert_array_equal(ea[key], eb[key], err_msg=f"{a.name}:{key}")
    serial = json.loads((tmp_path / "serial" / "card.json").read_text())
    parallel = json.loads((tmp_path / "parallel" / "card.json").read_text())
    assert serial == parallel


def test_import_cli_accepts_good_files_and_names_rejected_ones(tmp_path, capsys):
    expected = write_variants(tmp_path / "release", size=64)
    np.savez_compressed(tmp_path / "release" / "small_frames.npz", **make_episode(size=16))
    expected["small_frames.npz"] = "image frames are 16x16, expected 64x64"
    (tmp_path / "release" / "README.txt").write_text("not an episode")
    rc = collect.main(
        [
            "--import-from",
            str(tmp_path / "release"),
            "--out",
            str(tmp_path / "imported"),
            "--preset",
            "smoke",
            "--params",
            str(tmp_path / "none.yaml"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0
    card = json.loads((tmp_path / "imported" / "card.json").read_text())
    rejected = {row["file"]: row["reason"] for row in card["rejected"]}
    assert sorted(rejected) == sorted(expected)
    for name, reason in expected.items():
        assert reason in rejected[name], (name, rejected[name])
        assert f"rejected {name}: {rejected[name]}" in err
    assert card["episodes"] == 2 and card["source"] == "imported"
    assert card["ignored_non_npz"] == ["README.txt"]
    assert (tmp_path / "imported" / "provenance.json").exists()
    images = [load_episode(p, image_size=64)["image"] for p in episode_files(tmp_path / "imported")]
    np.testing.assert_array_equal(images[0], make_episode(size=64, seed=1)["image"])
    np.testing.assert_array_equal(images[1], make_episode(size=64, seed=2)["image"])


def test_import_that_accepts_nothing_leaves_the_existing_dataset_untouched(tmp_path, capsys):
    (tmp_path / "good").mkdir()
    np.savez_compressed(tmp_path / "good" / "a.npz", **make_episode(size=64, seed=1))
    args = ["--out", str(tmp_path / "dataset"), "--preset", "smoke", "--params", str(tmp_path / "none.yaml")]
    assert collect.main(["--import-from", str(tmp_path / "good"), *args]) == 0
    before = mtimes(tmp_path / "dataset")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.npz").write_bytes(b"not a zip archive")
    assert collect.main(["--import-from", str(tmp_path / "bad"), *args]) == 1
    assert "rejected b.npz" in capsys.readouterr().err
    assert mtimes(tmp_path / "dataset") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind


def test_help_runs_as_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "components.collect", "--help"], capture_output=True, text=True, check=True
    )
    assert "--import-from" in out.stdout and "--out" in out.stdout and "--preset" in out.stdout


def test_data_variations_script_recomputes_unrecorded_variations_and_splits_failures(mixed_dataset, tmp_path, capsys):
    import shutil

    spec = importlib.util.spec_from_file_location("data_variations", REPO / "scripts" / "data_variations.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, card = mixed_dataset
    recorded = [row["variation"] for row in card["per_episode"]]
    # Data collected before variations were recorded: the script recomputes them from the seeds.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    old_card = json.loads((old / "card.json").read_text())
    for row in old_card["per_episode"]:
        del row["variation"]
    del old_card["variations_started"]
    (old / "card.json").write_text(json.dumps(old_card))
    by_variation, count = script.data_variations(old)
    assert count == 50 and sorted(v for v, runs in by_variation.items() for _ in runs) == sorted(recorded)
    # One run failing the first covered variation and one variation the data never starts from.
    uncovered = min(set(range(50)) - set(recorded))
    run = tmp_path / "agents" / "seed-0" / "eval"
    run.mkdir(parents=True)
    rows = [(v, 0 if v in (recorded[0], uncovered) else 1) for v in range(50)]
    run.joinpath("episodes.csv").write_text(
        "episode,return,success,length\n" + "".join(f"{v},1.0,{s},5\n" for v, s in rows)
    )
    assert script.main(["--episodes", str(out), "--runs", str(tmp_path / "agents")]) == 0
    text = capsys.readouterr().out
    covered = len(set(recorded))
    assert f"3 data episodes start from {covered} of 50 variations" in text
    assert f"| {uncovered} | none | 1 of 1 |" in text
    assert f"covered 1/{covered} = {1 / covered:.2f}, not covered 1/{50 - covered} = {1 / (50 - covered):.2f}" in text


def test_cycled_starts_cover_distinct_variations_and_keep_seeded_recipes(tmp_path):
    cfg = smoke_params(*SHORT).collect
    assert collect_dataset(tmp_path / "seeded", cfg, progress=False).collected == [0, 1, 2]
    meta = json.loads((tmp_path / "seeded" / "episode_meta" / "000000.json").read_text())
    assert "variation" not in meta["recipe"]  # at its default the new key leaves recipes (and episodes) as they were
    seeded = collect_dataset(tmp_path / "seeded", cfg, progress=False)
    cycled = collect_dataset(tmp_path / "cycled", cfg.model_copy(update={"starts": "cycle"}), progress=False)
    assert [row["variation"] for row in cycled.card["per_episode"]] == [0, 1, 2]
    assert cycled.card["variations_started"] == 3
    # the seed alone would have drawn other variations for these episodes
    assert [row["variation"] for row in seeded.card["per_episode"]] != [0, 1, 2]
