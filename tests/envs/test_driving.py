"""The driving domain on highway-env: frames (never black), actions, reward and collisions, the IDM/MOBIL expert,
view styles, source videos from other scenarios and collection with a collision rate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highway_env")

from veorl.envs import ACTION_DIMS, EnvError, make_env  # noqa: E402
from veorl.envs.driving import COLLISION_PENALTY, STYLES  # noqa: E402
from veorl.envs.policies import behaviour_policy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env():
    env = make_env("highway", "highway", camera="topdown", size=64, episode_length=30, seed=0)
    yield env
    env.close()


def _not_black(frame: np.ndarray) -> None:
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame.mean() > 30 and frame.std() > 10, (frame.mean(), frame.std())


def test_frames_are_64x64_rgb_not_black_and_move(env):
    obs = env.reset(seed=0)
    _not_black(obs["image"])
    assert env.action_dim == ACTION_DIMS["highway"] == 2 and obs["state"].dtype == np.float32
    # The ego car is drawn in its own colour (green), traffic in blue.
    green = (obs["image"][..., 1] > 150) & (obs["image"][..., 0] < 100) & (obs["image"][..., 2] < 100)
    assert green.sum() > 5
    frames = [obs["image"]]
    for _ in range(5):
        obs, _, _, _ = env.step(np.array([0.5, 0.0]))
        frames.append(obs["image"])
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])  # the road markings scroll past


def test_sdl_dummy_driver_is_replaced_so_frames_are_not_black():
    """SDL_VIDEODRIVER=dummy makes highway-env disable its viewer (all-black frames); the adapter overrides it."""
    code = (
        "from veorl.envs import make_env; e = make_env('highway', 'highway', 'topdown', 64, 5, 0); "
        "f = e.reset(seed=1)['image']; print(f.mean())"
    )
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) > 30


def test_resets_are_deterministic_per_seed_and_variation(env):
    a = env.reset(seed=3)["image"]
    b = env.reset(seed=3)["image"]
    c = env.reset(seed=3, variation=1)["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_expert_drives_without_collision_and_earns_speed_and_lane_reward(env):
    obs = env.reset(seed=0)
    rewards, done, info = [], False, {}
    while not done:
        action = env.expert_action()
        assert action.shape == (2,) and np.all(np.abs(action) <= 1)
        obs, reward, done, info = env.step(action)
        rewards.append(reward)
    assert len(rewards) == 30 and not info["collision"] and info["success"] and not info["terminal"]
    assert 0.0 <= min(rewards) and max(rewards) <= 1.0 and np.mean(rewards) > 0.4


def test_leaving_the_road_is_a_terminal_collision_with_the_penalty(env):
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, reward, done, info = env.step(np.array([1.0, 1.0]))  # full throttle, hard right: off the road
        steps += 1
    assert steps < 29
    assert info["collision"] and info["terminal"] and not info["success"] and reward == -COLLISION_PENALTY
    with pytest.raises(EnvError, match="finished episode"):
        env.step(np.zeros(2))


def test_bad_actions_tasks_and_views_fail_clearly(env):
    env.reset(seed=0)
    with pytest.raises(EnvError, match="2 values"):
        env.step(np.zeros(3))
    with pytest.raises(EnvError, match="NaN"):
        env.step(np.array([np.nan, 0.0]))
    with pytest.raises(EnvError, match="unknown driving task"):
        make_env("highway", "racetrack-x", "topdown", 64, 10, 0)
    with pytest.raises(EnvError, match="unknown driving view"):
        make_env("highway", "highway", "corner", 64, 10, 0)


def test_view_styles_differ_from_the_target_view(env):
    env.reset(seed=0)
    frames = {name: env.render(name) for name in STYLES}
    for frame in frames.values():
        _not_black(frame)
    for name, frame in frames.items():
        if name != "topdown":
            assert np.abs(frame.astype(int) - frames["topdown"].astype(int)).mean() > 10, name


def test_behaviour_policy_quality_knob_is_seeded(env):
    def run(level: str, seed: int) -> list[np.ndarray]:
        policy = behaviour_policy(
            "highway",
            "highway",
            level,
            2,
            expert_noise=0.1,
            medium_noise=0.15,
            medium_random_prob=0.5,
            seed=seed,
            env=env,
        )
        obs, actions, done = env.reset(seed=0), [], False
        while not done and len(actions) < 10:
            actions.append(policy(obs["state"]))
            obs, _, done, _ = env.step(actions[-1])
        return actions

    assert all(np.array_equal(a, b) for a, b in zip(run("medium", 1), run("medium", 1)))
    assert not all(np.array_equal(a, b) for a, b in zip(run("medium", 1), run("medium", 2)))


def test_source_videos_film_other_scenarios_and_collection_reports_collisions(tmp_path, params):
    from components import collect, source_videos
    from veorl.data.episodes import episode_files, load_episode

    smoke = params("domain=driving", "source_videos.cameras=[wide, night]", "collect.episodes=3")
    card = source_videos.run(str(tmp_path / "videos"), smoke, progress=False)
    assert card["env"] == "highway" and "highway" not in card["tasks"]
    assert {f["camera"] for f in card["files"]} == {"wide", "night"}
    assert all(2 <= f["frames"] <= smoke.source_videos.episode_length for f in card["files"])
    data = collect.run(str(tmp_path / "episodes"), smoke, progress=False)
    assert data["env"] == "highway" and data["action_kind"] == "continuous" and data["episodes"] == 3
    assert 0.0 <= data["collision_rate"] <= 1.0
    collided = [bool(load_episode(p)["is_terminal"].any()) for p in episode_files(tmp_path / "episodes")]
    assert data["collision_rate"] == pytest.approx(np.mean(collided))
    assert [row["collision"] for row in data["per_episode"]] == collided
